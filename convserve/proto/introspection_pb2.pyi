from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DescribeModelRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ...) -> None: ...

class LayerArithmetic(_message.Message):
    __slots__ = ("name", "kind", "op", "input_shape", "output_shape", "params", "macs", "activations", "receptive_field", "jump", "detail")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    MACS_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    RECEPTIVE_FIELD_FIELD_NUMBER: _ClassVar[int]
    JUMP_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: str
    op: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    params: int
    macs: int
    activations: int
    receptive_field: _containers.RepeatedScalarFieldContainer[int]
    jump: _containers.RepeatedScalarFieldContainer[int]
    detail: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[str] = ..., op: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., output_shape: _Optional[_Iterable[int]] = ..., params: _Optional[int] = ..., macs: _Optional[int] = ..., activations: _Optional[int] = ..., receptive_field: _Optional[_Iterable[int]] = ..., jump: _Optional[_Iterable[int]] = ..., detail: _Optional[str] = ...) -> None: ...

class DescribeModelResponse(_message.Message):
    __slots__ = ("name", "version", "layers", "total_params", "total_macs", "feature_maps", "labels", "training_json", "preprocess_json", "execution_provider", "sha256", "precision", "export_json", "input_name", "default_outputs", "classified_output")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_PARAMS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MACS_FIELD_NUMBER: _ClassVar[int]
    FEATURE_MAPS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TRAINING_JSON_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_JSON_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    EXPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    CLASSIFIED_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerArithmetic]
    total_params: int
    total_macs: int
    feature_maps: _containers.RepeatedScalarFieldContainer[str]
    labels: _containers.RepeatedScalarFieldContainer[str]
    training_json: str
    preprocess_json: str
    execution_provider: str
    sha256: str
    precision: str
    export_json: str
    input_name: str
    default_outputs: _containers.RepeatedScalarFieldContainer[str]
    classified_output: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerArithmetic, _Mapping]]] = ..., total_params: _Optional[int] = ..., total_macs: _Optional[int] = ..., feature_maps: _Optional[_Iterable[str]] = ..., labels: _Optional[_Iterable[str]] = ..., training_json: _Optional[str] = ..., preprocess_json: _Optional[str] = ..., execution_provider: _Optional[str] = ..., sha256: _Optional[str] = ..., precision: _Optional[str] = ..., export_json: _Optional[str] = ..., input_name: _Optional[str] = ..., default_outputs: _Optional[_Iterable[str]] = ..., classified_output: _Optional[str] = ...) -> None: ...

class LayerFiltersRequest(_message.Message):
    __slots__ = ("name", "version", "feature_map")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FEATURE_MAP_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    feature_map: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., feature_map: _Optional[str] = ...) -> None: ...

class LayerFiltersResponse(_message.Message):
    __slots__ = ("feature_map", "layer", "shape", "weights")
    FEATURE_MAP_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    feature_map: str
    layer: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    weights: bytes
    def __init__(self, feature_map: _Optional[str] = ..., layer: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., weights: _Optional[bytes] = ...) -> None: ...
