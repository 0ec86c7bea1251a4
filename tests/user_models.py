"""A user model given to haqtune as ``module:callable`` (tests put this dir on sys.path)."""

from torch import nn


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.input_shape = (3, 16, 16)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
            nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), nn.ReLU(),
            nn.Conv2d(8, 16, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        return self.head(self.body(x))


def tiny_cnn(num_classes: int = 10) -> nn.Module:
    return TinyCNN(num_classes)


def no_layers() -> nn.Module:
    return nn.Sequential(nn.ReLU(), nn.Flatten())


class Shared(nn.Module):
    """The same Linear applied twice: one policy row."""

    def __init__(self) -> None:
        super().__init__()
        self.input_shape = (1, 1, 4)
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x.flatten(1)))


def shared() -> nn.Module:
    return Shared()
