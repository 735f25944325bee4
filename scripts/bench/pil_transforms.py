"""torchvision.transforms as diffusers' train_text_to_image_lora.py uses them, on PIL images, for the end-to-end bench
when torchvision is missing or does not import (its wheels are built for one torch version; see
run_diffusers_script.py). Each transform does what torchvision's PIL backend does: PIL's resize, the same crop
offsets, ToTensor and Normalize."""
import enum

import numpy as np
import torch
from PIL import Image


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


_PIL = {
    InterpolationMode.NEAREST: Image.NEAREST,
    InterpolationMode.NEAREST_EXACT: Image.NEAREST,
    InterpolationMode.BILINEAR: Image.BILINEAR,
    InterpolationMode.BICUBIC: Image.BICUBIC,
    InterpolationMode.BOX: Image.BOX,
    InterpolationMode.HAMMING: Image.HAMMING,
    InterpolationMode.LANCZOS: Image.LANCZOS,
}


class Compose:
    def __init__(self, transforms):
        self.transforms = transforms

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x


class Lambda:
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, x):
        return self.fn(x)


class Resize:
    """Resize(int): the shorter side to `size`, the longer one scaled (truncated), as torchvision's PIL path."""

    def __init__(self, size, interpolation=InterpolationMode.BILINEAR):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, img):
        w, h = img.size
        if isinstance(self.size, (list, tuple)):
            oh, ow = self.size
        else:
            short, long = (w, h) if w <= h else (h, w)
            if short == self.size:
                return img
            new_short, new_long = self.size, int(self.size * long / short)
            ow, oh = (new_short, new_long) if w <= h else (new_long, new_short)
        return img.resize((ow, oh), _PIL[self.interpolation])


class _SquareCrop:
    """A size x size crop (torchvision's F.crop on a PIL image) at the (top, left) offsets `_offsets` picks."""

    def __init__(self, size):
        self.size = size

    def __call__(self, img):
        w, h = img.size
        top, left = self._offsets(h, w, self.size)
        return img.crop((left, top, left + self.size, top + self.size))


class CenterCrop(_SquareCrop):
    @staticmethod
    def _offsets(h, w, size):
        return int(round((h - size) / 2.0)), int(round((w - size) / 2.0))


class RandomCrop(_SquareCrop):
    @staticmethod
    def _offsets(h, w, size):
        top = int(torch.randint(0, h - size + 1, size=(1,)).item())
        left = int(torch.randint(0, w - size + 1, size=(1,)).item())
        return top, left


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        return img.transpose(Image.FLIP_LEFT_RIGHT) if torch.rand(1) < self.p else img


class ToTensor:
    def __call__(self, img):
        a = np.asarray(img, dtype=np.uint8)
        if a.ndim == 2:
            a = a[:, :, None]
        return torch.from_numpy(a.copy()).permute(2, 0, 1).contiguous().float().div(255)


class Normalize:
    def __init__(self, mean, std):
        self.mean = mean
        self.std = std

    def __call__(self, t):
        mean = torch.as_tensor(self.mean, dtype=t.dtype).view(-1, 1, 1)
        std = torch.as_tensor(self.std, dtype=t.dtype).view(-1, 1, 1)
        return (t - mean) / std


