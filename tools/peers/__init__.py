"""The conformance harness run on real peers (PyTorch, HF transformers): the verdicts of spec/peers.md."""
