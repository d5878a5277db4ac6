"""ZeroPur as an ART preprocessing defence, for adaptive (BPDA / BPDA+EOT) attacks through the purifier.

Public API, usable from any ART (adversarial-robustness-toolbox >= 1.18) code::

    from art.attacks.evasion import ProjectedGradientDescent
    from zeropur_rt import Purifier
    from zeropur_export.attacks.art_bridge import ZeroPurPreprocessor, bpda_classifier

    pur = Purifier.load("artifacts/resnet20")
    clf = bpda_classifier(victim, pur, eot_samples=1)        # PyTorchClassifier(..., preprocessing_defences=[ZeroPurPreprocessor(pur)])
    pgd = ProjectedGradientDescent(clf, norm=np.inf, eps=8/255, eps_step=2/255, max_iter=20, num_random_init=1)
    x_adv = pgd.generate(x, y)                               # BPDA-PGD: forward purifies, backward is the identity

``ZeroPurPreprocessor`` is a plain (numpy) ``art.defences.preprocessor.Preprocessor``:

* ``__call__(x, y)`` purifies ``x`` with the runtime ``Purifier`` (in chunks of at most the
  artifact's max batch) and returns ``(purified, y)`` unchanged labels;
* ``estimate_gradient(x, grad)`` returns ``grad`` unchanged: BPDA with the identity as the
  backward approximation of the purifier (Athalye et al., 2018);
* ``apply_predict=True``, ``apply_fit=False``: it runs before every prediction and gradient.

How ART 1.20 uses it (checked in ``art/estimators/pytorch.py`` and
``art/estimators/classification/pytorch.py``): a ``PyTorchClassifier`` whose preprocessing
operations are not all ``PreprocessorPyTorch`` has ``all_framework_preprocessing=False``, so
``predict`` and ``loss_gradient`` on numpy input call ``_apply_preprocessing`` -> our
``__call__`` (no graph), differentiate the model at the purified images, then
``_apply_preprocessing_gradient`` -> our ``estimate_gradient`` (identity). That non-framework
path supports exactly one preprocessing defence (optionally followed by a mean/std
standardisation), so build the classifier with ``preprocessing=None`` (the zoo victims normalise
inside). ``ProjectedGradientDescent`` then picks its numpy implementation, which is what we want.

EOT: every shipped recipe is deterministic, so one sample per step is exact (the default). For a
randomised purifier (``random_start`` / ``blur_sigma_jitter``), ``bpda_classifier(..., eot_samples=k)``
returns a classifier whose ``loss_gradient`` averages ``k`` BPDA gradients, each with a fresh
purification of the same input. ART's APGD re-wraps its estimator as a plain ``PyTorchClassifier`` and
so drops that averaging; ``zeropur-export eval`` uses the torch modules of ``zeropur_export.attacks.adaptive``
instead, which keep their gradient under any attack.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

EVAL_HINT = "install the evaluation extras: pip install 'zeropur-rt[eval]'"

try:
    import art  # noqa: F401  (the package itself: its submodules may outlive it in sys.modules)
    import torch
    from art.defences.preprocessor import Preprocessor
    from art.estimators.classification import PyTorchClassifier
except ImportError as e:  # pragma: no cover - exercised by the tests with ART hidden
    raise ImportError(f"the robustness evaluation needs adversarial-robustness-toolbox and torch ({e}); {EVAL_HINT}") from e

__all__ = ["ZeroPurPreprocessor", "EOTPyTorchClassifier", "bpda_classifier"]


class ZeroPurPreprocessor(Preprocessor):
    """The ZeroPur runtime purifier as an ART preprocessor (forward = purify, backward = identity).

    ``purifier`` is a ``zeropur_rt.Purifier`` (any backend). ``batch_size`` caps the
    images per purifier call (default and maximum: the artifact's max batch). ``calls``,
    ``images`` and ``seconds`` count the work done, for cost reports.
    """

    params = ["batch_size"]

    def __init__(self, purifier: Any, batch_size: int | None = None, apply_fit: bool = False,
                 apply_predict: bool = True) -> None:
        super().__init__(is_fitted=True, apply_fit=apply_fit, apply_predict=apply_predict)
        self.purifier = purifier
        self.batch_size = int(batch_size or purifier.max_batch)
        self.calls, self.images, self.seconds = 0, 0, 0.0
        self._check_params()

    def _check_params(self) -> None:
        if not 1 <= self.batch_size <= self.purifier.max_batch:
            raise ValueError(f"batch_size {self.batch_size} does not fit this artifact (1..{self.purifier.max_batch})")

    def __call__(self, x: np.ndarray, y: Any | None = None) -> tuple[np.ndarray, Any | None]:
        x = np.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"ZeroPurPreprocessor expects NCHW images, got shape {x.shape}")
        t0 = time.perf_counter()
        # ART's random init and steps are clipped to clip_values, but float rounding can leave
        # values a hair outside [0, 1]; the purifier rejects those, so clip first.
        x32 = np.clip(x, 0.0, 1.0).astype(np.float32, copy=False)
        out = np.empty_like(x32)
        for i in range(0, len(x32), self.batch_size):
            out[i:i + self.batch_size] = self.purifier.purify(x32[i:i + self.batch_size])
        self.calls += 1
        self.images += len(x32)
        self.seconds += time.perf_counter() - t0
        return out.astype(x.dtype, copy=False), y

    def estimate_gradient(self, x: np.ndarray, grad: np.ndarray) -> np.ndarray:
        """BPDA: the purifier's backward pass approximated by the identity."""
        return grad

    def fit(self, x: np.ndarray, y: np.ndarray | None = None, **kwargs: Any) -> None:
        """Nothing to fit: ZeroPur is training-free."""


class EOTPyTorchClassifier(PyTorchClassifier):
    """``PyTorchClassifier`` whose ``loss_gradient`` averages ``eot_samples`` BPDA gradients (EOT).

    Each sample re-runs the preprocessing defences, so a randomised purifier gives a fresh draw.
    """

    def __init__(self, *args: Any, eot_samples: int = 1, **kwargs: Any) -> None:
        if int(eot_samples) < 1:
            raise ValueError(f"eot_samples must be >= 1, got {eot_samples}")
        self.eot_samples = int(eot_samples)
        super().__init__(*args, **kwargs)

    def loss_gradient(self, x, y, training_mode: bool = False, **kwargs):  # noqa: D102 - ART's docstring
        g = super().loss_gradient(x, y, training_mode=training_mode, **kwargs)
        for _ in range(self.eot_samples - 1):
            g = g + super().loss_gradient(x, y, training_mode=training_mode, **kwargs)
        return g / self.eot_samples if self.eot_samples > 1 else g


def art_classifier(model: "torch.nn.Module", nb_classes: int = 10, input_shape: tuple[int, ...] = (3, 32, 32),
                   preprocessing_defences: list | None = None, eot_samples: int = 1,
                   device: str = "cpu") -> PyTorchClassifier:
    """An ART classifier over a model taking [0, 1] images and returning logits (normalisation inside);
    ``device`` "gpu" for a model on the current CUDA device."""
    kw = dict(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(input_shape), nb_classes=nb_classes,
              clip_values=(0.0, 1.0), preprocessing=None, preprocessing_defences=preprocessing_defences,
              device_type=device)
    if eot_samples > 1:
        return EOTPyTorchClassifier(eot_samples=eot_samples, **kw)
    return PyTorchClassifier(**kw)


def bpda_classifier(model: "torch.nn.Module", purifier: Any, eot_samples: int = 1, batch_size: int | None = None,
                    nb_classes: int | None = None) -> PyTorchClassifier:
    """The victim behind ZeroPur, as ART sees it: forward = classify(purify(x)), gradient = BPDA (+ EOT)."""
    chw = tuple(purifier.chw)
    n_cls = nb_classes or int(getattr(getattr(purifier, "manifest", None), "num_classes", 10))
    return art_classifier(model, n_cls, chw, [ZeroPurPreprocessor(purifier, batch_size)], eot_samples)
