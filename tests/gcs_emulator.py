"""Runs gcp-storage-emulator (the GCS JSON API, from PyPI) on 127.0.0.1 for the tests:

    python tests/gcs_emulator.py PORT BUCKET

The stub lacks two behaviours of Cloud Storage that tensorstore (Orbax's array writer, whose OCDBT
manifest is read-modify-write) relies on, so they are added here, as the real service documents
them: a media download carries the object's generation in ``x-goog-generation``; an upload with
``ifGenerationMatch`` fails with 412 when the object's generation differs (0: when it exists).
"""

from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects

_download, _insert = objects.download, objects.insert


def _generation(storage, bucket: str, name: str) -> str:
    try:
        return str(storage.get_file_obj(bucket, name)["generation"])
    except NotFound:
        return "0"


def download(request, response, storage, *args, **kwargs):
    gen = _generation(storage, request.params["bucket_name"], request.params["object_id"])
    if gen != "0":
        response["x-goog-generation"] = gen
    return _download(request, response, storage, *args, **kwargs)


def _precondition_failed(request, response, storage) -> bool:
    want = request.query.get("ifGenerationMatch")
    name = (request.query.get("name") or [None])[0]
    if not want or name is None:
        return False
    if _generation(storage, request.params["bucket_name"], name) != want[0]:
        response.status = HTTPStatus.PRECONDITION_FAILED
        response.json({"error": {"code": 412, "message": "At least one of the pre-conditions you specified did not hold."}})
        return True
    return False


def insert(request, response, storage, *args, **kwargs):
    if _precondition_failed(request, response, storage):
        return None
    return _insert(request, response, storage, *args, **kwargs)


def _patched(handlers: dict) -> dict:
    swap = {_download: download, _insert: insert}
    return {method: swap.get(fn, fn) for method, fn in handlers.items()}


server.HANDLERS = tuple((regex, _patched(h)) for regex, h in server.HANDLERS)
objects.download, objects.insert = download, insert  # the router's fallback looks them up by name

if __name__ == "__main__":
    port, bucket = int(sys.argv[1]), sys.argv[2]
    server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket).run()
