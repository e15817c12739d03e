"""Where mapping frames come from: any pose dataset of the package (a rosbag2 / ROS 1 bag,
a 7-Scenes, Cambridge or KITTI folder), as :class:`~vizloc_ros.mapping.mapper.MapFrame`
items read on demand, with depth where the dataset has it (7-Scenes ``.depth.png``)."""
from __future__ import annotations

import numpy as np

from vizloc_ros.mapping.mapper import MapFrame
from vizloc_ros.training.scene_geometry import depth_path, load_depth


class DatasetFrames:
    """A :class:`~vizloc_ros.training.pose_dataset.PoseDataset` seen as mapping frames."""

    def __init__(self, dataset, use_depth: bool = True):
        self.dataset = dataset
        items = getattr(dataset, "items", [])
        self.use_depth = bool(use_depth) and bool(items) and all(
            depth_path(item[0]).is_file() for item in items[:3]) and getattr(dataset, "name", "") == "7scenes"

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> MapFrame:
        sample = self.dataset[index]
        depth = load_depth(depth_path(self.dataset.items[index][0])) if self.use_depth else None
        return MapFrame(image=np.asarray(sample["image"]), t=np.asarray(sample["t"], float),
                        q=np.asarray(sample["q"], float), depth=depth, stamp=float(sample["stamp"]))


__all__ = ["DatasetFrames"]
