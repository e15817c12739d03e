"""vizloc_ros: one setup.py for colcon (ament_python) and for pip."""
from glob import glob

from setuptools import find_packages, setup

PACKAGE = "vizloc_ros"

# Ranges that have wheels on x86_64 and on aarch64 (Jetson: torch/torchvision come
# from NVIDIA's JetPack wheels; pip keeps them when they satisfy these ranges).
INSTALL_REQUIRES = [
    "numpy>=1.24,<3",
    "torch>=2.1,<3",
    "torchvision>=0.16,<1",
    "transforms3d>=0.4.1,<0.5",
    "gtsam>=4.2,<4.4",
    "rosbags>=0.9.20,<0.12",
    "safetensors>=0.4,<1",
    "tqdm>=4.64,<5",
    "matplotlib>=3.6,<4",
    "evo>=1.25,<2",
    "pyyaml>=6,<7",
    "pillow>=9,<13",
    "opencv-python-headless>=4.8,<6",  # PnP-RANSAC for the scene-coordinate maps (aarch64 wheels on PyPI)
]

EXTRAS = {
    # pytest: with ROS 2 Jazzy sourced, every pytest run loads launch_testing's plugin, whose
    # pytest_pycollect_makemodule(path, parent) hook pytest 9 refuses, so a ROS machine needs
    # pytest < 9. It cannot be pinned here: gtsam 4.3.0, the only gtsam wheel for Python 3.12
    # (Jazzy), declares pytest>=9.0.1, and `pip install .[test]` would find no solution. The
    # README's ROS install installs pytest < 9 afterwards (gtsam never imports pytest).
    "test": ["pytest>=7", "hypothesis>=6.80", "jsonschema>=4"],
    "export": ["onnx>=1.14", "onnxruntime>=1.16"],
}


def data_files():
    files = [
        ("share/ament_index/resource_index/packages", [f"resource/{PACKAGE}"]),
        (f"share/{PACKAGE}", ["package.xml"]),
    ]
    for folder in ("launch", "config", "weights"):
        # training resume states (*.state.safetensors) stay out of the install
        found = sorted(f for f in glob(f"{folder}/*")
                       if not f.endswith(("/__pycache__", ".state.safetensors")) and "/." not in f)
        if found:
            files.append((f"share/{PACKAGE}/{folder}", found))
    return files


setup(
    name=PACKAGE,
    version="0.1.0",
    packages=find_packages(exclude=["test", "test.*", "benchmarks"]),
    data_files=data_files(),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    python_requires=">=3.10",
    zip_safe=True,
    maintainer="vizloc_ros maintainers",
    maintainer_email="maintainers@vizloc-ros.invalid",
    description="Camera relocalization for ROS 2 (PoseNet / MapNet + pose-graph fusion)",
    license="Apache-2.0",
    tests_require=["pytest"],
    entry_points={
        "console_scripts": [
            "vizloc-train = vizloc_ros.training.train:main",
            "vizloc-eval = vizloc_ros.training.evaluate:main",
            "vizloc-replay = vizloc_ros.replay.cli:main",
            "vizloc-calibrate = vizloc_ros.replay.calibrate:main",
            "vizloc-synth = vizloc_ros.sim.synthetic:main",
            "vizloc-export = vizloc_ros.training.export:main",
            "vizloc-map = vizloc_ros.mapping.cli:main",
            "vizloc-bag = vizloc_ros.training.dataset_bag:main",
            "vizloc_regressor = vizloc_ros.nodes.regressor_node:main",
            "vizloc_fusion = vizloc_ros.nodes.fusion_node:main",
        ],
    },
)
