"""A generated rosbag2 rewritten the way real ROS 1 recordings look (TUM RGB-D style), for
the tests that read recordings: replay and training from bags."""
from rosbags.rosbag1 import Writer
from rosbags.typesys import Stores, get_typestore, get_types_from_msg

from vizloc_ros import geometry
from vizloc_ros.ros_io import messages
from vizloc_ros.ros_io.bag_io import read_messages
from vizloc_ros.ros_io.ground_truth import tf_edges


def as_ros1_bag(bag, path, mocap_offset):
    """The images of ``bag`` and its ground truth as a TUM RGB-D style ROS 1 bag: ``/tf`` of
    the old type tf/tfMessage, frame names with a leading slash, the motion capture on
    /world -> /mocap, and the fixed /mocap -> /base_link and camera mount republished on
    /tf (no /tf_static)."""
    store = get_typestore(Stores.ROS1_NOETIC)
    store.register(get_types_from_msg("geometry_msgs/TransformStamped[] transforms", "tf/msg/tfMessage"))
    T = store.types

    def header(msg, frame):
        stamp = msg.header.stamp
        return T["std_msgs/msg/Header"](seq=0, stamp=T["builtin_interfaces/msg/Time"](
            sec=stamp.sec, nanosec=stamp.nanosec), frame_id=frame)

    def transform(msg, parent, child, t, q):
        V, Q = T["geometry_msgs/msg/Vector3"], T["geometry_msgs/msg/Quaternion"]
        return T["geometry_msgs/msg/TransformStamped"](
            header=header(msg, parent), child_frame_id=child, transform=T["geometry_msgs/msg/Transform"](
                translation=V(x=t[0], y=t[1], z=t[2]), rotation=Q(w=q[0], x=q[1], y=q[2], z=q[3])))

    with Writer(path) as writer:
        image_conn = writer.add_connection("/camera/rgb/image_color", "sensor_msgs/msg/Image", typestore=store)
        tf_conn = writer.add_connection("/tf", "tf/msg/tfMessage", typestore=store)
        mount = next(tf_edges(r.msg.transforms) for r in read_messages(bag, ["/tf_static"]))
        (base, camera), base_T_camera = next(iter(mount.items()))
        for record in read_messages(bag, ["/camera/image_raw", "/ground_truth/pose"]):
            msg = record.msg
            if record.topic == "/camera/image_raw":
                out = T["sensor_msgs/msg/Image"](header=header(msg, "/" + msg.header.frame_id),
                                                 height=msg.height, width=msg.width, encoding=msg.encoding,
                                                 is_bigendian=0, step=msg.step, data=msg.data)
                writer.write(image_conn, record.log_time_ns,
                             store.serialize_ros1(out, "sensor_msgs/msg/Image"))
            else:
                t, q = messages.pose_from_msg(msg)
                t_mocap, q_mocap = geometry.pose_compose(t, q, *geometry.pose_inverse(*mocap_offset))
                tfs = T["tf/msg/tfMessage"](transforms=[
                    transform(msg, "/world", "/mocap", t_mocap, q_mocap),
                    transform(msg, "/mocap", "/base_link", *mocap_offset),
                    transform(msg, "/" + base, "/" + camera, *base_T_camera)])  # the mount, on /tf
                writer.write(tf_conn, record.log_time_ns, store.serialize_ros1(tfs, "tf/msg/tfMessage"))
