"""Start the bucket server from its files, without putting their parent folder on sys.path.

The parent is usually the caller's site-packages, where an old `huggingface_hub` may live: adding it to the
path would shadow the isolated environment's own. So the package is loaded by file location instead.
Run as: python /path/to/bucket_server/boot.py --socket ... --endpoint ...
"""

import importlib.util
import os
import sys

here = os.path.dirname(os.path.abspath(__file__))
if sys.path and os.path.abspath(sys.path[0] or os.getcwd()) == here:
    del sys.path[0]  # the script's own folder: its modules are only importable as bucket_server.*
spec = importlib.util.spec_from_file_location("bucket_server", os.path.join(here, "__init__.py"), submodule_search_locations=[here])
package = importlib.util.module_from_spec(spec)
sys.modules["bucket_server"] = package
spec.loader.exec_module(package)

from bucket_server.server import main  # noqa: E402

sys.exit(main())
