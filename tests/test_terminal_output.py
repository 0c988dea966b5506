"""What the CLI prints from a bucket reaches a terminal as text, never as control sequences: any bucket writer could
otherwise retitle, recolour or script the terminal of whoever runs `lookup`, `explain`, `ls`, `du`..."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from optimum_neuron_cache.cli import cli, terminal_safe
from optimum_neuron_cache.client import BucketClient
from optimum_neuron_cache.buckets import BucketRef

#: Set the title, clear the screen, a one-byte CSI (C1), DEL, a bidi override, a newline faking a line.
HOSTILE = "\x1b]0;owned\x07\x1b[2J\x9b31m\x7f\u202e\nfake: line"
CONTROLS = ("\x1b", "\x07", "\x9b", "\x7f", "\u202e")


def _hostile_bucket(tmp_path: Path, version: str) -> BucketRef:
    """A directory bucket with an export record whose every free-text field carries control sequences."""
    ref = BucketRef("dir", str(tmp_path / "bucket"))
    BucketClient(ref).create()
    area = Path(ref.location) / f"neuronxcc-{version}" / "models" / "org--m" / "default"
    record = {"model_id": "org/m", "task": "default", "compiler_version": version,
              "export_config": {"batch_size": 1, f"key{HOSTILE}": f"value{HOSTILE}"},
              "compile_flags": [f"--flag{HOSTILE}"], "modules": [], "created_at": f"2026{HOSTILE}", "schema": 1}
    (area / "exports").mkdir(parents=True)
    (area / "exports" / "0123456789abcdef0123.json").write_text(json.dumps(record))
    entry = Path(ref.location) / f"neuronxcc-{version}" / "MODULE_1+ab"
    entry.mkdir(parents=True)
    (entry / "model.neff").write_bytes(b"neff")
    (entry / "model.done").write_bytes(b"")
    return ref


def _assert_safe(output: str) -> None:
    for control in CONTROLS:
        assert control not in output, (control, output)
    assert "\\x1b" in output
    assert not any(line.startswith("fake: line") for line in output.splitlines())


def test_terminal_safe_escapes_c0_del_c1_and_bidi_controls():
    assert terminal_safe("plain text: é, 日本, → ok") == "plain text: é, 日本, → ok"
    assert terminal_safe(HOSTILE) == "\\x1b]0;owned\\x07\\x1b[2J\\x9b31m\\x7f\\u202e\\x0afake: line"


def test_lookup_explain_ls_and_du_print_bucket_text_escaped(tmp_path, version):
    ref = _hostile_bucket(tmp_path, version)
    runner = CliRunner()
    for args in (["lookup", "org/m", "--compiler-version", version],
                 ["explain", "org/m", "--compiler-version", version],
                 ["ls"], ["ls", "--model", "org/m"], ["du"]):
        result = runner.invoke(cli, [*args, "--bucket", ref.location])
        assert result.exit_code == 0, result.output
        if args[0] in ("lookup", "explain"):
            _assert_safe(result.output)
        else:
            assert not any(control in result.output for control in CONTROLS)
    as_json = runner.invoke(cli, ["lookup", "org/m", "--compiler-version", version, "--bucket", ref.location, "--json"])
    assert as_json.exit_code == 0 and not any(control in as_json.output for control in CONTROLS)
    assert json.loads(as_json.output)[0]["compile_flags"] == [f"--flag{HOSTILE}"]  # the data itself is intact


def test_the_cli_log_handler_escapes_each_line():
    """Library warnings name bucket paths: the CLI's own log handler prints each line escaped (a traceback keeps
    its lines)."""
    import logging

    from optimum_neuron_cache.cli import _TerminalSafeFormatter

    record = logging.LogRecord("optimum_neuron_cache", logging.WARNING, __file__, 1, "ignoring %s", (HOSTILE,), None)
    line = _TerminalSafeFormatter("%(levelname)s %(message)s").format(record)
    assert line == f"WARNING ignoring {terminal_safe(HOSTILE)}" and "\n" not in line
    try:
        raise ValueError(HOSTILE)
    except ValueError:
        import sys as _sys

        record.exc_info = _sys.exc_info()
    lines = _TerminalSafeFormatter("%(message)s").format(record).split("\n")
    assert len(lines) > 2 and not any(control in "".join(lines) for control in CONTROLS)
