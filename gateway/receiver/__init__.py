"""A registry-side FHIR receiver: `create_receiver_app(data_dir, scan=...)`; `rekey(db, translate)`."""

from gateway.receiver.app import create_receiver_app
from gateway.receiver.db import ReceiverDB
from gateway.receiver.rekey import RekeyResult, rekey, ttp_translator

__all__ = ["ReceiverDB", "RekeyResult", "create_receiver_app", "rekey", "ttp_translator"]
