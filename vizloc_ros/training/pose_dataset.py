"""The base of every pose dataset: a list of (image, camera pose, stamp), and its error.

Kept apart from the loaders (:mod:`vizloc_ros.training.datasets`,
:mod:`vizloc_ros.training.bag_dataset`) so that they import it one way: ``open_dataset``
knows every loader, and no loader needs ``open_dataset``.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import list_topics, require_messages

#: what fixes a missing camera mount, in the bag loaders' options
#: (:class:`~vizloc_ros.training.bag_dataset.BagDataset`, :mod:`~vizloc_ros.training.unlabeled`)
CAMERA_MOUNT_HINT = "pass camera_extrinsic, or base_frame if the robot's base has another name"


class DatasetError(ValueError):
    """A dataset folder or file is missing, malformed or inconsistent."""


def load_image(path: Path) -> np.ndarray:
    """Read an image file as HxWx3 uint8 RGB (grey images are replicated)."""
    try:
        with Image.open(path) as img:
            img.load()
            return np.asarray(img.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise DatasetError(f"image file is missing: {path}") from None
    except (OSError, Image.DecompressionBombError) as exc:  # a header of 20000x20000 px, say
        raise DatasetError(f"image file is unreadable: {path} ({exc})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of an image file from its header, without decoding it."""
    try:
        with Image.open(path) as img:
            return img.size
    except FileNotFoundError:
        raise DatasetError(f"image file is missing: {path}") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"image file is unreadable: {path} ({exc})") from None


class PoseDataset:
    """Base class: a list of (image path, t, q, stamp); images are read lazily.

    Subclasses fill ``self.items``. ``preload=True`` reads every image once (small
    synthetic sets train much faster from memory).
    """

    name = "poses"

    def __init__(self):
        self.items: list[tuple[Path, np.ndarray, np.ndarray, float]] = []
        self._cache: dict[int, np.ndarray] | None = None
        #: frames of the source that did not become samples, by reason (a bag's images
        #: without ground truth near their stamp, or undecodable): vizloc-eval says how
        #: many of the frames it scored
        self.left_out: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        path, t, q, stamp = self.items[index]
        if self._cache is not None and index in self._cache:
            image = self._cache[index]
        else:
            image = load_image(path)
        return {"image": image, "t": t.copy(), "q": q.copy(), "stamp": float(stamp),
                "index": int(index)}

    def preload(self, workers: int | None = None) -> "PoseDataset":
        """Decode every image into memory; PNG/JPEG decoding releases the GIL, so a few
        threads (default: up to 8, one per core) cut the start-up of large sets."""
        workers = workers or min(8, os.cpu_count() or 1)
        paths = [item[0] for item in self.items]
        if workers <= 1 or len(paths) < 64:
            images = [load_image(path) for path in paths]
        else:
            with ThreadPoolExecutor(workers) as pool:
                images = list(pool.map(load_image, paths, chunksize=32))
        self._cache = dict(enumerate(images))
        return self

    def poses(self) -> tuple[np.ndarray, np.ndarray]:
        """All (t, q) of the split as arrays, without reading images."""
        if not self.items:
            return np.zeros((0, 3)), np.zeros((0, 4))
        return (np.stack([it[1] for it in self.items]), np.stack([it[2] for it in self.items]))

    def stamps(self) -> np.ndarray:
        return np.asarray([it[3] for it in self.items], dtype=float)

    def check_image_sizes(self) -> tuple[int, int]:
        """The one (width, height) of the split's images; ``DatasetError`` naming an image of
        another size, and the size of the others.

        Why before training: batches stack images, and one odd frame in a 7-Scenes folder
        otherwise ends an epoch in with numpy's "all input arrays must have the same
        shape", naming nothing. Reads only the files' headers (Pillow opens lazily) or the
        images already in memory.
        """
        sizes: dict[tuple[int, int], list[int]] = {}
        for index, item in enumerate(self.items):
            if self._cache is not None and index in self._cache:
                height, width = self._cache[index].shape[:2]
            else:
                height, width = image_size(item[0])[::-1]
            sizes.setdefault((width, height), []).append(index)
        if len(sizes) <= 1:
            return next(iter(sizes), (0, 0))
        common = max(sizes, key=lambda size: len(sizes[size]))
        odd = min((size for size in sizes if size != common), key=lambda size: sizes[size][0])
        first_odd, first_common = self.items[sizes[odd][0]][0], self.items[sizes[common][0]][0]
        raise DatasetError(
            f"{first_odd}: image is {odd[0]}x{odd[1]}, but {len(sizes[common])} of the split's "
            f"{len(self.items)} images are {common[0]}x{common[1]} (e.g. {first_common}); training "
            f"batches need one size: resize the {len(self.items) - len(sizes[common])} other(s)")

    def check_images(self, limit: int | None = None) -> None:
        """Open (part of) the images now so a broken file fails early."""
        for item in self.items[:limit]:
            load_image(item[0])


class ImageSampler:
    """Every ``every``-th image message of a bag, decoded to RGB; the ones that cannot be
    decoded are counted (``bad``) and logged once by :meth:`warn`, never fatal: one
    corrupt frame in an hour of recording should not stop a training run."""

    def __init__(self, bag, topic: str, every: int):
        if every < 1:
            raise DatasetError("every must be >= 1")
        self.bag, self.topic, self.every = bag, topic, every
        self.seen = 0
        self.bad = 0

    def decode(self, msg):
        """``(stamp_ns, rgb, frame_id)`` of a kept image, or None (skipped or bad)."""
        self.seen += 1
        if (self.seen - 1) % self.every:
            return None
        try:
            return messages.header_stamp_ns(msg), messages.image_to_rgb(msg), msg.header.frame_id
        except (ValueError, AttributeError):
            self.bad += 1
            return None

    def warn(self, log) -> None:
        if self.bad:
            log.warning("%s: %d image(s) on %s could not be decoded and were skipped",
                        self.bag, self.bad, self.topic)


def bag_topics(bag: Path, required: dict[str, str]) -> dict[str, str]:
    """``{topic: type}`` of a bag; ``DatasetError`` when it cannot be read, or when a
    ``required`` topic (``{topic: what it is}``) is missing, naming the topics it has, or
    has no messages, naming the topics of its type that have some."""
    try:
        topics = list_topics(bag)
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(str(exc)) from None
    listing = ", ".join(f"{k} [{v}]" for k, v in sorted(topics.items()))
    for topic, what in required.items():
        if topic not in topics:
            raise DatasetError(f"{what} topic {topic!r} is not in {bag}; it has: {listing}")
    same_kind = {topic: sorted(name for name, kind in topics.items() if kind == topics[topic]) for topic in required}
    try:
        require_messages(bag, required, same_kind)
    except ValueError as exc:
        raise DatasetError(str(exc)) from None
    return topics

