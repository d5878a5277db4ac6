"""Serving ZeroPur on NVIDIA Triton Inference Server: the model repository writer (``repository``), the
Python-backend model it installs (``triton_model``, runs inside Triton only) and a loopback launcher of
a real tritonserver for tests and benchmarks (``server``). See docs/serving.md."""
