"""Workload identity reaches every training process, and is what their storage uses.

A pod with IRSA-style workload identity gets `AWS_ROLE_ARN` and
`AWS_WEB_IDENTITY_TOKEN_FILE` and no keys. The trainer's launcher builds the environment of
its ranks (`_worker_env` with the PyTorchJob variables) and starts them with the same
torchrun command as in pods (`torchrun_command`); here the ranks run `identity_probe`,
which writes through the trainer's `Storage` which credential source boto3 resolved. moto
serves both S3 and STS (AssumeRoleWithWebIdentity) on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import tally

from evaclip.s3server import EmbeddedS3
from evaclip.trainer.launch import _worker_env, free_port, pytorchjob_env, torchrun_command

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
NPROC = 2


def test_every_rank_uses_the_web_identity(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("eyJhbGciOiJSUzI1NiJ9.projected-service-account-token.signature")
    role = "arn:aws:iam::123456789012:role/evaclip-trainer"
    with EmbeddedS3(buckets=["identity"]) as s3:
        base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        base.update(AWS_ROLE_ARN=role, AWS_WEB_IDENTITY_TOKEN_FILE=str(token),
                    AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true",
                    AWS_ENDPOINT_URL_STS=s3.endpoint,  # moto's STS, never AWS
                    PYTHONPATH=os.pathsep.join(filter(None, [str(HERE),
                                                             os.environ.get("PYTHONPATH")])))
        port = free_port()
        env = _worker_env(base, {**pytorchjob_env(NPROC, port), "PROBE_BUCKET": "identity",
                                 "EVACLIP_S3_ENDPOINT": s3.endpoint}, NPROC)
        done = subprocess.run(torchrun_command(NPROC, master_port=port, module="identity_probe"),
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        storage = s3.storage()
        reports = [json.loads(storage.read_bytes(f"s3://identity/rank-{r}.json"))
                   for r in range(NPROC) if storage.exists(f"s3://identity/rank-{r}.json")]
    honoured = [r for r in reports if r["method"] == "assume-role-with-web-identity"
                and r["roleArn"] == role and r["tokenFile"] == str(token)]
    tally.record("web-identity", runs=NPROC, survived=len(honoured))
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(r["rank"] for r in honoured) == [str(r) for r in range(NPROC)], reports
