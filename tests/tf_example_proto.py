"""tf.train.Example messages built with protobuf itself (the real schema, no TensorFlow), to write test records
the way TFDS does."""

from __future__ import annotations

import functools


@functools.cache
def _example_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    f = descriptor_pb2.FileDescriptorProto(
        name="jdistill_test_example.proto", package="tensorflow", syntax="proto3"
    )
    label, T = descriptor_pb2.FieldDescriptorProto, descriptor_pb2.FieldDescriptorProto

    def message_field(message, name: str, number: int, type_name: str, repeated: bool = False, **options):
        """A field of message type ``tensorflow.<type_name>``."""
        message.field.add(
            name=name,
            number=number,
            type=T.TYPE_MESSAGE,
            type_name=f".tensorflow.{type_name}",
            label=label.LABEL_REPEATED if repeated else label.LABEL_OPTIONAL,
            **options,
        )

    for name, kind in (("BytesList", T.TYPE_BYTES), ("FloatList", T.TYPE_FLOAT), ("Int64List", T.TYPE_INT64)):
        m = f.message_type.add(name=name)
        m.field.add(name="value", number=1, type=kind, label=label.LABEL_REPEATED)
    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), 1
    ):
        message_field(feature, name, number, type_name, oneof_index=0)
    features = f.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=label.LABEL_OPTIONAL)
    message_field(entry, "value", 2, "Feature")
    message_field(features, "feature", 1, "Features.FeatureEntry", repeated=True)
    message_field(f.message_type.add(name="Example"), "features", 1, "Features")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("tensorflow.Example"))


def serialize_example(features: dict[str, list]) -> bytes:
    """{name: values} -> serialized Example; bytes/str values become bytes_list, ints int64_list, floats
    float_list."""
    example = _example_class()()
    for name, values in features.items():
        feature = example.features.feature[name]
        if all(isinstance(v, bytes | str) for v in values):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        elif all(isinstance(v, int) for v in values):
            feature.int64_list.value.extend(values)
        else:
            feature.float_list.value.extend(values)
    return example.SerializeToString()
