"""Model zoo: architectures, real weights, tap validation for user modules."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from zeropur_export.victims.taps import TapSpec, make_victim  # noqa: E402
from zeropur_export.victims.zoo import ZOO, build_net, load_victim  # noqa: E402


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_architecture_builds_with_valid_taps(name):
    v = load_victim(name, random_init=True)
    c, h, w = v.spec.input_shape
    x = torch.rand(2, c, h, w)
    logits, taps = v.run(x)
    assert logits.shape == (2, v.spec.num_classes)
    assert taps[v.spec.embedding].dim() == 2
    assert all(taps[t].dim() == 4 for t in (*v.spec.ila, *v.spec.lpips))


@pytest.mark.parametrize("name,expected_1000", [("resnet20", 80.8), ("resnet56", 82.8)])
def test_real_weights_reproduce_published_accuracy_on_this_copy(name, expected_1000, cifar, request):
    v = request.getfixturevalue("victim20" if name == "resnet20" else "victim56")
    x, y = cifar
    with torch.no_grad():
        pred = torch.cat([v(torch.from_numpy(x[i:i + 250])).argmax(1) for i in range(0, 1000, 250)])
    acc = 100 * (pred.numpy() == y).mean()
    assert abs(acc - expected_1000) <= 0.3, acc  # the data README's figure for rows 0-999


def test_resnet50_state_dict_keys_follow_torchvision_layout():
    sd = build_net("resnet50")[0].state_dict()
    assert len(sd) == 320  # torchvision resnet50: 320 entries, num_batches_tracked included
    for k in ("conv1.weight", "bn1.running_var", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
              "layer4.2.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"):
        assert k in sd, k
    assert tuple(sd["layer2.0.conv2.weight"].shape) == (128, 128, 3, 3)


def test_cifar_resnet_matches_weight_file_layout():
    assert len([k for k in build_net("resnet20")[0].state_dict() if "num_batches" not in k]) == 97
    assert len([k for k in build_net("resnet56")[0].state_dict() if "num_batches" not in k]) == 277


class _Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4, 10)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))


def _spec(**kw):
    d = dict(embedding="head:in", ila=("body.1", "body.3"), lpips=("body.1", "body.3"), mean=(0.5,) * 3,
             std=(0.25,) * 3, input_shape=(3, 16, 16), num_classes=10)
    d.update(kw)
    return TapSpec(**d)


def test_user_module_with_tap_names_works():
    v = make_victim(_Tiny(), _spec())
    _, taps = v.run(torch.rand(3, 3, 16, 16))
    assert taps["head:in"].shape == (3, 4) and taps["body.3"].shape == (3, 4, 16, 16)


def test_unknown_tap_lists_valid_module_names():
    with pytest.raises(ValueError, match=r"not found.*valid module names: body, body\.0"):
        make_victim(_Tiny(), _spec(ila=("body.7",)))


def test_tap_with_wrong_rank_is_refused():
    with pytest.raises(ValueError, match="needs rank 4"):
        make_victim(_Tiny(), _spec(lpips=("head",)))
    with pytest.raises(ValueError, match="needs rank 2"):
        make_victim(_Tiny(), _spec(embedding="body.3"))


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ValueError, match="known: preact_resnet18, resnet20"):
        build_net("resnet18x")


def test_float64_copy_is_independent(victim20):
    v64 = victim20.to_dtype(torch.float64)
    x = torch.rand(2, 3, 32, 32)
    a = victim20.run(x)[1]["layer3"]
    b = v64.run(x.double())[1]["layer3"]
    assert b.dtype == torch.float64 and np.allclose(a.numpy(), b.numpy(), atol=1e-4)
    assert victim20.run(x)[1].keys() == v64.run(x.double())[1].keys()
