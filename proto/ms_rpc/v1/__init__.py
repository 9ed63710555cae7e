"""ms_rpc.v1, the wire contract. PROTOCOL_VERSION is the version both sides speak: the front sends it in every
request and checks the worker's Describe; the worker refuses any other."""

from ms_rpc.v1.worker_pb2 import PROTOCOL_VERSION_CURRENT as PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION"]
