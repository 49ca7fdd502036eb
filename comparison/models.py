"""VGG11_bn with the CIFAR head, as in PyTorch_CIFAR10, with a channel-width multiplier."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from actuallysparse.fusion import use_native_layers

# Configuration "A" of Simonyan & Zisserman: numbers are conv output channels, "M" a 2x2 max-pool.
VGG11_CHANNELS: tuple[int | str, ...] = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
VGG11_HIDDEN = 4096
VGG11_FIRST_CHANNELS = VGG11_CHANNELS[0]


def scaled(channels: int, width: float) -> int:
    """Number of channels of a layer of ``channels`` in a VGG of the given width multiplier (at least 1)."""
    return max(1, round(channels * width))


class VGG(nn.Module):
    r"""VGG11_bn for 32x32 inputs (CIFAR head): conv features, 1x1 average pool, three Linear layers.

    Module names (``features.N``, ``classifier.N``) match the public PyTorch_CIFAR10
    ``vgg11_bn.pt`` state dict, so a width-1.0, 10-class model loads it unchanged.

    Args:
        num_classes: number of output classes. Default: 10
        width: multiplier applied to every conv channel count and to the classifier's hidden
            width (4096); 1.0 is the real VGG11_bn (28.15 M parameters). Default: 1.0

    Shape:
        - Input: :math:`(N, 3, H, W)` with H and W multiples of 32 (32 for CIFAR and digits).
        - Output: :math:`(N, \text{num\_classes})`.

    Attributes:
        features: ``nn.Sequential`` of Conv2d(3x3, padding 1) + BatchNorm2d + ReLU blocks and
            max-pools.
        avgpool: ``nn.AdaptiveAvgPool2d((1, 1))``.
        classifier: ``Linear ReLU Dropout Linear ReLU Dropout Linear``.

    The pooling, batch norm and dropout layers are the library's (``use_native_layers``).

    Example::

        >>> model = VGG(num_classes=10, width=0.125)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, width: float = 1.0) -> None:
        super().__init__()
        if not width > 0:
            raise ValueError(f"width must be > 0, got {width}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.width = width
        layers: list[nn.Module] = []
        in_channels = 3
        for entry in VGG11_CHANNELS:
            if entry == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            out_channels = scaled(int(entry), width)
            layers += [
                nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            ]
            in_channels = out_channels
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        hidden = scaled(VGG11_HIDDEN, width)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(hidden, num_classes),
        )
        self.reset_parameters()
        # torch 2.14's CPU pooling, training-mode batch norm and dropout were over a third of a pruned
        # quarter-width VGG11_bn's training step: every model the harness builds, the dense reference
        # included, runs the library's, each ReLU after a batch norm computed by the norm (the same
        # numbers; dropout the same distribution), so no method gains.
        use_native_layers(self)

    def reset_parameters(self) -> None:
        """Initialise as torchvision's VGG does (Kaiming convs, N(0, 0.01) Linear weights, zero biases)."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        return self.classifier(torch.flatten(x, 1))

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, width={self.width}"


def vgg11_bn(num_classes: int = 10, width: float = 1.0, seed: int | None = None) -> VGG:
    """A freshly initialised :class:`VGG`; with ``seed`` the initial weights depend on nothing else."""
    if seed is None:
        return VGG(num_classes, width)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VGG(num_classes, width)


def read_init_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in an ``--init`` file: a bare state dict, or a checkpoint holding one under
    ``"state_dict"`` (PyTorch Lightning); a ``"model."`` prefix on every key is dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is not a checkpoint that loads safely, or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init file {path} does not exist; expected a vgg11_bn state dict (.pt)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(f"--init file {path} is not a PyTorch checkpoint that loads safely "
                         f"({type(error).__name__}: {str(error).splitlines()[0][:200]}); "
                         f"expected a vgg11_bn state dict (.pt)") from error
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"--init file {path} holds a {type(state).__name__}, expected a state dict")
    if state and all(key.startswith("model.") for key in state):
        state = {key[len("model."):]: value for key, value in state.items()}
    return state


def checkpoint_width(path: str | Path) -> float:
    """The width multiplier of the VGG11_bn whose state dict is in ``path``, read from its first
    convolution (64 output channels at width 1.0).

    Raises:
        FileNotFoundError, ValueError: as :func:`read_init_state`, or the file holds no
            ``features.0.weight`` of a VGG11_bn.
    """
    state = read_init_state(path)
    first = state.get("features.0.weight")
    if not isinstance(first, torch.Tensor) or first.dim() != 4:
        raise ValueError(f"--init file {path} has no features.0.weight of a VGG11_bn (a 4-D convolution weight), "
                         f"so its width cannot be read; give --width explicitly")
    return first.shape[0] / VGG11_FIRST_CHANNELS


def load_init(model: nn.Module, path: str | Path) -> None:
    """Load a state dict (e.g. PyTorch_CIFAR10's ``vgg11_bn.pt``) into ``model`` in place.

    Accepts a bare state dict or a checkpoint holding one under ``"state_dict"``
    (PyTorch Lightning); a ``"model."`` prefix on every key is dropped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the keys or shapes do not match the model (e.g. a width-1.0, 10-class
            file given to a model of another width or class count).
    """
    state = read_init_state(path)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = [
        f"{key}: file {tuple(state[key].shape)}, model {tuple(value.shape)}"
        for key, value in expected.items()
        if key in state and tuple(state[key].shape) != tuple(value.shape)
    ]
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"missing keys {missing[:5]}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected[:5]}")
        if wrong_shape:
            problems.append(f"shape mismatch {wrong_shape[:3]}")
        raise ValueError(
            f"--init file {path} does not fit VGG11_bn(width={getattr(model, 'width', '?')}, "
            f"num_classes={getattr(model, 'num_classes', '?')}): " + "; ".join(problems)
            + ". A PyTorch_CIFAR10 vgg11_bn.pt needs --width 1.0 and a 10-class data set."
        )
    model.load_state_dict(state)
