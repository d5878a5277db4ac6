"""Graphs: tracing the reference's graph functions into forward-only ONNX, exporting an artifact, and checking its
parity with the reference."""
