"""Test and demo tools, never imported by the core package.

- `simulated_compiler`: writes cache entries exactly as neuronx-cc behind libneuronxla would (no SDK needed).
- `simulated_neuronx_cc`: stand-ins for the SDK's executables (`neuronx-cc`, `neuron_parallel_compile`) and
  libneuronxla's JIT wrapper, on top of `simulated_compiler`.
- `invariants`: what must hold in a local cache and a bucket after any trial (docs/reliability.md).

Used by the tests, the quick start and examples, `bench/` and `stress/`.
"""
