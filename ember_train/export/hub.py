"""Publishing an export on the Hugging Face Hub (``export.hub_repo_id``).

Access is checked before training, so a missing token or an offline machine fails in seconds,
not after hours. The upload runs after the export (and ``results.json``) is on disk, so a failed
upload never loses the model: the error says how to upload the directory by hand.
"""

from __future__ import annotations

import logging
from pathlib import Path

from huggingface_hub import HfApi, constants
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

from ember_train.config import ConfigError, ExportConfig

logger = logging.getLogger(__name__)


class HubUploadError(RuntimeError):
    """The upload failed after the export was written; the message says how to upload it by hand."""


def check_hub_access(repo_id: str) -> str:
    """The Hub user this process would upload ``repo_id`` as; :class:`ConfigError` if it cannot."""
    where = f"export.hub_repo_id={repo_id!r}"
    login = "Log in with `hf auth login` or set HF_TOKEN (a token with write access)"
    if constants.HF_HUB_OFFLINE:
        raise ConfigError(
            f"{where} needs the Hugging Face Hub, but HF_HUB_OFFLINE is set; "
            "unset it, or drop export.hub_repo_id and upload the export later"
        )
    try:
        user = HfApi().whoami()
    except LocalTokenNotFoundError as e:
        raise ConfigError(f"{where}: no Hugging Face token. {login}") from e
    except Exception as e:  # a rejected token, no network, DNS, proxy, a Hub error
        status = getattr(getattr(e, "response", None), "status_code", None)
        if isinstance(e, HfHubHTTPError) and status in (401, 403):
            raise ConfigError(f"{where}: the Hub refused the token ({e}). {login}") from e
        raise ConfigError(
            f"{where}: cannot reach the Hugging Face Hub at {constants.ENDPOINT} ({type(e).__name__}: {e}); "
            "check the network, or drop export.hub_repo_id and upload the export later"
        ) from e
    role = user.get("auth", {}).get("accessToken", {}).get("role")
    if role == "read":  # the commonest mistake, which would otherwise surface only after training
        raise ConfigError(f"{where}: the Hugging Face token is read-only. {login}")
    name = str(user.get("name", ""))
    logger.info("the export will be uploaded to %s as %s", repo_id, name)
    return name


def push_export(export_dir: str | Path, export: ExportConfig, command: str | None = None) -> str:
    """Upload the export directory to ``export.hub_repo_id`` (created if missing); its URL.

    ``command`` (what produced the export) goes into the commit's description.
    """
    repo_id = export.hub_repo_id
    if not repo_id:
        raise ValueError("push_export needs export.hub_repo_id")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=export.hub_private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(export_dir),
            commit_message="Upload ember-train export",
            commit_description=f"`{command}`" if command else None,
            repo_type="model",
        )
    except Exception as e:
        raise HubUploadError(
            f"uploading {export_dir} to the Hub repository {repo_id!r} failed ({type(e).__name__}: {e}); "
            f"the export is complete on disk: upload it with `hf upload {repo_id} {export_dir}`"
        ) from e
    return str(url)
