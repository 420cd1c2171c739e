"""One training rank's view of its credentials (run by torchrun in test_web_identity.py).

Each rank builds the trainer's `Storage` from its environment exactly as the trainer does
and writes, through it, which credential source boto3 resolved, to `<bucket>/rank-N.json`.
"""

from __future__ import annotations

import json
import os

import boto3

from evaclip.spec import StorageSpec
from evaclip.storage import Storage


def main() -> None:
    rank = os.environ["RANK"]
    storage = Storage.from_env(StorageSpec(endpoint=os.environ["EVACLIP_S3_ENDPOINT"]))
    method = boto3.session.Session().get_credentials().method
    report = {"rank": rank, "method": method, "roleArn": os.environ.get("AWS_ROLE_ARN"),
              "tokenFile": os.environ.get("AWS_WEB_IDENTITY_TOKEN_FILE")}
    storage.write_bytes(f"s3://{os.environ['PROBE_BUCKET']}/rank-{rank}.json",
                        json.dumps(report).encode())


if __name__ == "__main__":
    main()
