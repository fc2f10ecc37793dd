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
    for name, kind in (("BytesList", T.TYPE_BYTES), ("FloatList", T.TYPE_FLOAT), ("Int64List", T.TYPE_INT64)):
        m = f.message_type.add(name=name)
        m.field.add(name="value", number=1, type=kind, label=label.LABEL_REPEATED)
    feature = f.message_type.add(name="Feature")
    feature.oneof_decl.add(name="kind")
    for number, (name, type_name) in enumerate(
        (("bytes_list", "BytesList"), ("float_list", "FloatList"), ("int64_list", "Int64List")), 1
    ):
        feature.field.add(
            name=name,
            number=number,
            type=T.TYPE_MESSAGE,
            type_name=f".tensorflow.{type_name}",
            label=label.LABEL_OPTIONAL,
            oneof_index=0,
        )
    features = f.message_type.add(name="Features")
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=T.TYPE_STRING, label=label.LABEL_OPTIONAL)
    entry.field.add(
        name="value",
        number=2,
        type=T.TYPE_MESSAGE,
        type_name=".tensorflow.Feature",
        label=label.LABEL_OPTIONAL,
    )
    features.field.add(
        name="feature",
        number=1,
        type=T.TYPE_MESSAGE,
        type_name=".tensorflow.Features.FeatureEntry",
        label=label.LABEL_REPEATED,
    )
    example = f.message_type.add(name="Example")
    example.field.add(
        name="features",
        number=1,
        type=T.TYPE_MESSAGE,
        type_name=".tensorflow.Features",
        label=label.LABEL_OPTIONAL,
    )
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
