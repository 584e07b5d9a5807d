"""Credentials stay out of what a run writes, logs and echoes.

A URL with userinfo (`http://user:password@host`, `https://token@host`) in any config field is refused when the
config is validated (`longctx.config`): credentials come from the environment (AWS_ACCESS_KEY_ID /
AWS_SECRET_ACCESS_KEY for S3, MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or a token for MLflow), so they
never reach `config.yaml`, the trackers' hyperparameters, Ray's runtime_env or its logs. Text we echo (config
errors) goes through `redact`, so a refused value is shown without its secret.

    has_credentials("http://u:pw@127.0.0.1:9000")   # True
    redact("endpoint http://u:pw@127.0.0.1:9000")    # 'endpoint http://***@127.0.0.1:9000'
"""

from __future__ import annotations

import re

# scheme://userinfo@ - the authority ends at the first / ? or #, so `s3://bucket/key@v2` has no userinfo
_USERINFO = re.compile(r"\b([A-Za-z][A-Za-z0-9+.\-]*://)[^/?#@\s'\"]+@")

CREDENTIALS_HELP = ("credentials never go in a URL (they would land in config.yaml, logs and trackers): give them "
                    "through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for S3, "
                    "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN for MLflow)")


def has_credentials(text: str) -> bool:
    """True when `text` holds a URL with userinfo (`scheme://user[:password]@...`)."""
    return bool(_USERINFO.search(text))


def redact(text: str) -> str:
    """`text` with the userinfo of every URL replaced by `***`."""
    return _USERINFO.sub(r"\1***@", text)


def credential_fields(value, where: str) -> list[str]:
    """Dotted paths under `where` (with the value redacted) of the strings in a plain value (str, list, tuple,
    dict; not models, which check their own fields) that hold a URL with credentials."""
    found: list[str] = []
    if isinstance(value, str):
        if has_credentials(value):
            found.append(f"{where}={redact(value)!r}")
    elif isinstance(value, dict):
        for k, v in value.items():
            found += credential_fields(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found += credential_fields(v, f"{where}[{i}]")
    return found
