"""The wire protocol: framing, message encoding, typed ops and serialization."""

from .codec import Encoder, decode
from .framing import FrameDecoder, encode_frames
from .messages import OPS, PROTOCOL_VERSION, Message, decode_message
from .serialize import Payload, Ref, deserialize, serialize, serialize_function

__all__ = [
    "OPS",
    "PROTOCOL_VERSION",
    "Encoder",
    "FrameDecoder",
    "Message",
    "Payload",
    "Ref",
    "decode",
    "decode_message",
    "deserialize",
    "encode_frames",
    "serialize",
    "serialize_function",
]
