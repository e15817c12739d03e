"""A setting defined once: its type (the dataclass annotation), default, bounds, choices,
one-line description and how it appears as a ROS parameter.

Why a module of its own, below every stage: the fusion's :class:`~vizloc_ros.fusion.FusionConfig`
and the pipeline's :class:`~vizloc_ros.pipeline.fusion_core.FusionSettings` define their
fields with :func:`setting`, and the nodes' parameter declarations, ``config/vizloc.yaml``
and the parameter tables of ``docs/ROS.md`` are derived from those fields
(``vizloc_ros.nodes.params``; ``python -m vizloc_ros.nodes.param_files --write``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

#: annotation types of the fields that are tuples (the annotation names the kind)
Vec3 = tuple   # (x, y, z)
Pose = tuple   # ((tx, ty, tz), (qw, qx, qy, qz))

#: annotation (a string: ``from __future__ import annotations``) -> the kind of value
_KIND_OF_ANNOTATION = {"int": "int", "int | None": "opt_int", "float": "float",
                       "float | None": "opt_float", "bool": "bool", "str": "str",
                       "Vec3": "vec3", "Pose": "pose"}


@dataclass(frozen=True)
class Bounds:
    """Numeric bounds of a parameter: ``value >= minimum``, ``value > above``, ``value < below``.

    Shared by the dataclass settings and the node-only parameters (``vizloc_ros.nodes.params``).
    """

    minimum: float | None = None
    above: float | None = None
    below: float | None = None

    def violated(self, value) -> str | None:
        """The bound ``value`` breaks, as text (``"must be > 0"``), or None."""
        if self.minimum is not None and not value >= self.minimum:
            return f"must be >= {self.minimum:g}"
        if self.above is not None and not value > self.above:
            return f"must be > {self.above:g}"
        if self.below is not None and not value < self.below:
            return f"must be < {self.below:g}"
        return None

    def __str__(self) -> str:
        if self.above is not None and self.below is not None:
            return f"({self.above:g}, {self.below:g})"
        parts = [f">= {self.minimum:g}" if self.minimum is not None else "",
                 f"> {self.above:g}" if self.above is not None else "",
                 f"< {self.below:g}" if self.below is not None else ""]
        return ", ".join(p for p in parts if p)


NO_BOUNDS = Bounds()


@dataclass(frozen=True)
class Setting:
    """What a settings field is, besides its name, type and default.

    ``ros_name``: the node parameter setting this field ("" when the field is not a
    parameter: ``not_ros`` then says why). ``required``: a string that must not be empty.
    ``none_as``: the ROS value that stands for None (ROS parameters have no None:
    ``window_seconds`` None is 0.0 there); the conversion in both directions is
    :meth:`to_ros` / :meth:`from_ros` and nowhere else.
    """

    description: str
    bounds: Bounds = NO_BOUNDS
    choices: tuple = ()
    ros_name: str = ""
    not_ros: str = ""
    none_as: Any = None
    required: bool = False

    def to_ros(self, value):
        """A field value as the ROS parameter holds it: None -> ``none_as``."""
        return self.none_as if value is None else value

    def from_ros(self, value):
        """A ROS parameter value as the field takes it: ``none_as`` -> None."""
        return None if self.none_as is not None and value == self.none_as else value


def setting(default, description: str, *, minimum=None, above=None, below=None, choices=(),
            ros_name: str | None = None, not_ros: str = "", none_as=None, required: bool = False):
    """A settings dataclass field: its default and its :class:`Setting` (see there).

    The ROS parameter has the field's name unless ``ros_name`` says otherwise; ``not_ros``
    (the reason) makes the field no parameter at all.
    """
    meta = Setting(description=description, bounds=Bounds(minimum, above, below), choices=tuple(choices),
                   ros_name="" if not_ros else (ros_name or ""), not_ros=not_ros, none_as=none_as,
                   required=required)
    return field(default=default, metadata={"setting": meta})


def field_setting(f) -> Setting:
    """The :class:`Setting` of a settings field, with ``ros_name`` filled in."""
    meta = f.metadata["setting"]
    if not meta.not_ros and not meta.ros_name:
        meta = replace(meta, ros_name=f.name)
    return meta


def field_kind(f) -> str:
    """The kind of value a field holds (``int``, ``opt_float``, ``pose``, ...), from its annotation."""
    try:
        return _KIND_OF_ANNOTATION[str(f.type)]
    except KeyError:
        raise TypeError(f"settings field {f.name}: annotation {f.type!r} is not one of "
                        f"{', '.join(_KIND_OF_ANNOTATION)}") from None
