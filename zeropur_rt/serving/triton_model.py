"""Triton Python-backend model serving ZeroPur with ``zeropur_rt`` (written as ``model.py`` by
``zeropur-rt triton-repo``; it runs only inside Triton's Python backend stub).

Its config.pbtxt parameters say what it does:

* ``mode``: ``purify`` (outputs PURIFIED, LOGITS of the purified images, LABEL) or ``classify`` (LOGITS and
  LABEL of the images as given);
* ``continuous``: ``1`` for a decoupled model that hands every request to one
  ``zeropur_rt.continuous.ContinuousScheduler`` (images join and leave the running batch at each loop
  step); ``0`` for whole-loop batching: the requests of one ``execute`` (what Triton's dynamic batcher
  formed) go through ``Purifier`` as one batch;
* ``artifact`` (relative to the model directory), ``backend``, ``device``, ``threads``, ``overrides`` (JSON).

Inputs, one per request: IMAGE (float32 NCHW in [0, 1]) or IMAGE_U8 (uint8 NHWC). A bad request gets its
own error response naming the problem; the other requests of the batch are served.
"""
import json
import os
import sys
from pathlib import Path

# Triton's stub embeds Python isolated from PYTHONPATH. zeropur_rt.serving.server.TritonServer passes the
# caller's import path here instead, so a source checkout is served without installing it.
for _p in reversed([p for p in os.environ.get("ZEROPUR_RT_PYTHONPATH", "").split(os.pathsep) if p]):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402


def _array(tensor):
    """A request tensor as a numpy array (a copy: the request's memory is not ours to keep).

    Through DLPack, not ``as_numpy()``: the stub's numpy bridge is compiled against numpy 1, and under
    numpy 2 ``as_numpy()`` reads zeros and ``pb_utils.Tensor(name, array)`` sends empty tensors (tritonserver
    2.51, the nvidia-pytriton 0.7.0 stubs). DLPack works with numpy >= 1.22 of either major version."""
    return np.array(np.from_dlpack(tensor))


def _tensor(name, array):
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


def _error(msg):
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(msg) if code is None else pb_utils.TritonError(msg, code)


class TritonPythonModel:
    def initialize(self, args):
        from zeropur_rt.pipeline import Purifier

        config = json.loads(args["model_config"])
        p = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        model_dir = Path(args["model_repository"])
        device = p.get("device") or None
        if args.get("model_instance_kind") == "GPU":
            device = f"cuda:{args['model_instance_device_id']}"
        self.mode = p.get("mode", "purify")
        self.pur = Purifier.load(model_dir / p.get("artifact", "artifact"), backend=p.get("backend", "onnxruntime"),
                                 device=device, threads=int(p.get("threads") or 0) or None,
                                 overrides=json.loads(p.get("overrides") or "{}"))
        self.sched = None
        if p.get("continuous") == "1":
            from zeropur_rt.continuous import ContinuousScheduler
            self.sched = ContinuousScheduler(self.pur).start()

    def _images(self, request):
        """The request's images as validated float32 NCHW (raises ValueError naming the problem)."""
        f32 = pb_utils.get_input_tensor_by_name(request, "IMAGE")
        u8 = pb_utils.get_input_tensor_by_name(request, "IMAGE_U8")
        if (f32 is None) == (u8 is None):
            raise ValueError("send exactly one of IMAGE (float32 NCHW in [0, 1]) or IMAGE_U8 (uint8 NHWC)")
        if u8 is not None:
            return self.pur.prepare(_array(u8), uint8_nhwc=True)
        return self.pur.prepare(_array(f32))

    def _response(self, images, logits):
        outs = [_tensor("LOGITS", logits.astype(np.float32)), _tensor("LABEL", logits.argmax(1).astype(np.int64)[:, None])]
        if self.mode == "purify":
            outs.insert(0, _tensor("PURIFIED", images.astype(np.float32)))
        return pb_utils.InferenceResponse(output_tensors=outs)

    def execute(self, requests):
        if self.sched is not None:
            for r in requests:
                self._submit(r)
            return None
        xs = []
        for r in requests:
            try:
                xs.append(self._images(r))
            except ValueError as e:
                xs.append(e)
        good = [x for x in xs if not isinstance(x, ValueError)]
        try:
            if good:
                batch = np.concatenate(good)
                out = self.pur.purify(batch) if self.mode == "purify" else batch
                logits = self.pur.logits(out)
        except Exception as e:  # noqa: BLE001 - every request of the batch gets the reason
            return [pb_utils.InferenceResponse(error=pb_utils.TritonError(f"purification failed: {e}"))
                    for _ in requests]
        responses, at = [], 0
        for x in xs:
            if isinstance(x, ValueError):
                responses.append(pb_utils.InferenceResponse(error=_error(str(x))))
                continue
            sl = slice(at, at + len(x))
            at += len(x)
            responses.append(self._response(out[sl], logits[sl]))
        return responses

    def _submit(self, request):
        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            fut = self.sched.submit(self._images(request))
        except ValueError as e:
            sender.send(pb_utils.InferenceResponse(error=_error(str(e))), flags=final)
            return

        def done(f):
            try:
                resp = self._response(*f.result())
            except Exception as e:  # noqa: BLE001
                resp = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"purification failed: {e}"))
            sender.send(resp, flags=final)
        fut.add_done_callback(done)

    def finalize(self):
        if self.sched is not None:
            self.sched.close()
        self.pur.close()
