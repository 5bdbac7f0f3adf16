"""The Hugging Face hub as a start sees it, before anything loads: reachable or not (one fast
probe per process), offline (``HF_HUB_OFFLINE``), what its local cache holds.

A recipe that names hub ids (``model.name_or_path``, ``data.path``) on a machine where the hub
cannot be reached would otherwise spend tens of seconds in the hub libraries' retries, then
report one missing thing per start. :func:`problems` finds every one at once, in seconds, and
each message points at the two ways out (:data:`OFFLINE_FORM`).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

PROBE_TIMEOUT_S = 5.0
"""How long the probe waits for the hub's answer (a refused connection answers at once)."""

OFFLINE_FORM = ("give local copies instead, as in the README's offline form: "
                "--model.name_or_path /models/NAME (config.json, weights, tokenizer) and "
                "--data.path /data/DIR (train.jsonl, test.jsonl); or, where they are in the hub "
                "cache already, set HF_HUB_OFFLINE=1 (the cache only, no network retries)")
"""Where every hub message sends the user (README: 'Without the hub, point at local copies')."""

HubId = tuple[str, str, str]
"""(recipe key, hub id, repo type "model" or "dataset")."""


def offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) as the hub libraries read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    """The hub's address (HF_ENDPOINT, default https://huggingface.co)."""
    from huggingface_hub import constants

    return str(constants.ENDPOINT)


@functools.cache
def unreachable(url: str, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why ``url`` cannot be reached (None: it answered, whatever its HTTP status); asked once
    per process. One request, no retries; proxies from the environment apply."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            return None
    except urllib.error.HTTPError:  # an answer: the hub is there
        return None
    except urllib.error.URLError as exc:
        return str(exc.reason)
    except (TimeoutError, OSError) as exc:
        return str(exc) or type(exc).__name__


def cached(repo_id: str, repo_type: str) -> bool:
    """Whether the local cache holds anything of ``repo_id``: the hub cache's repo folder, or
    (a dataset) the datasets library's prepared copy."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    if (Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id,
                                                        repo_type=repo_type)).is_dir():
        return True
    if repo_type != "dataset":
        return False
    datasets_cache = os.environ.get("HF_DATASETS_CACHE") or str(
        Path(constants.HF_HOME) / "datasets")
    return (Path(datasets_cache) / repo_id.replace("/", "___")).is_dir()


def problems(ids: list[HubId]) -> list[str]:
    """What stops the hub ids a start names, found before anything loads: offline, each one
    the cache does not hold; online, all of them in one problem when the hub cannot be reached
    (one probe, :data:`PROBE_TIMEOUT_S` at most)."""
    if not ids:
        return []
    if offline():
        missing = [f"{key} {repo!r}" for key, repo, kind in ids if not cached(repo, kind)]
        if not missing:
            return []
        return [f"HF_HUB_OFFLINE is set and the hub cache holds no copy of "
                f"{' or '.join(missing)}; give local copies (--model.name_or_path "
                "/models/NAME, --data.path /data/DIR, as in the README's offline form), or "
                "download them once where the hub is reachable"]
    reason = unreachable(endpoint())
    if reason is None:
        return []
    named = ", ".join(f"{key} {repo!r}" for key, repo, _ in ids)
    return [f"the Hugging Face hub ({endpoint()}) cannot be reached ({reason}), and the recipe "
            f"names hub ids: {named}; {OFFLINE_FORM}"]
