"""Readiness check run in the TorchServe container (exec probe): every listed model has a READY worker.

Usage: python3 ready.py MANAGEMENT_URL MODEL [MODEL ...]   (exit 0 = ready)

With token authorization on (TorchServe 0.12's default), kubelet's httpGet cannot pass the per-pod
random key, so this reads the management key from key_file.json in the working directory. Keys expire
(token_expiration_min, 60 by default): on a 400 it asks for a new management key with the API key, as
TorchServe's token API allows, and retries once. Only the management key changes; clients' inference
keys are untouched. Standard library only: runs in the stock TorchServe image.
"""
import json
import os
import sys
import urllib.error
import urllib.request

KEY_FILE = os.environ.get("TS_KEY_FILE", "key_file.json")


def _keys():
    try:
        with open(KEY_FILE) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _get(url, key):
    headers = {"Authorization": "Bearer " + key} if key else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=3) as r:
        return json.loads(r.read() or b"null")


def _describe(base, model):
    keys = _keys()
    key = keys["management"]["key"] if keys else None
    try:
        return _get(base + "/models/" + model, key)
    except urllib.error.HTTPError as exc:
        if exc.code != 400 or not keys:
            raise
    # expired management key: renew it with the API key, then retry with the new one
    # (TorchServe rewrites key_file.json; its reply is not JSON, so read the file again)
    request = urllib.request.Request(base + "/token?type=management",
                                     headers={"Authorization": "Bearer " + keys["API"]["key"]})
    urllib.request.urlopen(request, timeout=3).close()
    return _get(base + "/models/" + model, _keys()["management"]["key"])


def main(argv):
    base, models = argv[1].rstrip("/"), argv[2:]
    for model in models:
        info = _describe(base, model)
        if not any(w.get("status") == "READY" for entry in info for w in entry.get("workers", [])):
            print(model + ": no READY worker")
            return 1
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv))
    except Exception as exc:  # any failure = not ready, with the reason in the probe's event
        print("not ready: %s" % exc)
        sys.exit(1)
