"""Secret redaction: the one function (`redact`) every file and tracker of a run passes its data through, so the
values of secret environment variables reach neither the run directory (config.yaml, summary.json, metrics.jsonl,
completions.jsonl, eval_problems.jsonl, eval-*.json) nor W&B.

Redaction works on data, before it is serialised, never on the serialised text: a string value that holds a secret
becomes that string with the secret replaced by `***`, and the YAML or JSON writer then quotes the result as it
quotes any string (`entity: '***'`). Keys, numbers, booleans and None are never changed, so a redacted file always
parses, to the same structure and types as the unredacted one; only the secret strings differ.

What counts as a secret (secret_values):

- the value of an environment variable whose name has a secret word as one of its parts (parts are split at
  `_`, `-`, `.` and camelCase): KEY, KEYS, APIKEY, TOKEN, TOKENS, PASSWORD, PASSWORDS, PASSWD, PASSPHRASE, SECRET,
  SECRETS, CREDENTIAL, CREDENTIALS. So MY_API_KEY, HF_TOKEN, WANDB_API_KEY, DB_PASSWORD, CLIENT_SECRET, authToken
  are secret names; TOKENIZER_PATH, TOKENIZERS_PARALLELISM, MONKEY_MODE are not (TOKENIZER is not the word TOKEN).
- not a name that marks a location: its last part is PATH, PATHS, DIR, DIRS, DIRECTORY, FILE, FILES, FILENAME,
  HOME or FOLDER (HF_TOKEN_PATH, SSL_KEY_FILE, KEY_DIR name where a secret lies, not the secret; only the last part
  counts, so HOME_ASSISTANT_TOKEN stays a secret);
- not a value too short or too common to be a secret: under MIN_SECRET_LENGTH (8) characters, a word of
  configuration such as `disabled` or `localhost` (COMMON_VALUES), or the name of an existing file or directory
  (SSH_KEY=~/.ssh/id_ed25519 says where a key is). Eight is the usual minimum length of a password; real API keys
  and tokens are far longer (HF 37 characters, W&B 40). A shorter value would replace ordinary text: with
  MY_API_KEY=abc123 a W&B entity `abc123` is kept as it is, not turned into `***`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REDACTED = "***"
MIN_SECRET_LENGTH = 8
SECRET_WORDS = frozenset(
    {
        "KEY",
        "KEYS",
        "APIKEY",
        "TOKEN",
        "TOKENS",
        "PASSWORD",
        "PASSWORDS",
        "PASSWD",
        "PASSPHRASE",
        "SECRET",
        "SECRETS",
        "CREDENTIAL",
        "CREDENTIALS",
    }
)
LOCATION_WORDS = frozenset({"PATH", "PATHS", "DIR", "DIRS", "DIRECTORY", "FILE", "FILES", "FILENAME", "HOME", "FOLDER"})
COMMON_VALUES = frozenset(
    {
        "true",
        "false",
        "none",
        "null",
        "yes",
        "no",
        "on",
        "off",
        "enabled",
        "disabled",
        "online",
        "offline",
        "localhost",
        "default",
        "undefined",
    }
)


def name_parts(name: str) -> list[str]:
    """The upper-cased word parts of an environment variable's name: split at non-alphanumerics and camelCase."""
    spaced = re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", name)  # authToken -> auth_Token
    return [part for part in re.split(r"[^A-Za-z0-9]+", spaced.upper()) if part]


def is_secret_name(name: str) -> bool:
    """Whether an environment variable named `name` holds a secret: a secret word is one of its parts, and its last
    part does not mark a path, directory or file."""
    parts = name_parts(name)
    return bool(parts) and bool(SECRET_WORDS.intersection(parts)) and parts[-1] not in LOCATION_WORDS


def is_secret_value(value: str) -> bool:
    """Whether `value` could be a secret: long enough, not a common configuration word, not an existing path."""
    if len(value) < MIN_SECRET_LENGTH or value.strip().lower() in COMMON_VALUES:
        return False
    try:
        return not Path(value).expanduser().exists()
    except (OSError, ValueError):  # too long for a path, or a NUL byte: not a path, so possibly a secret
        return True


def secret_values(environ=None) -> list[str]:
    """The secret values of `environ` (default os.environ), longest first, so a secret that contains another is
    replaced whole."""
    environ = os.environ if environ is None else environ
    found = {value for name, value in environ.items() if is_secret_name(name) and is_secret_value(value)}
    return sorted(found, key=len, reverse=True)


def redact(value, secrets: list[str] | None = None):
    """`value` (a string, or dicts and lists of them to any depth) with each occurrence of a secret (secret_values of
    the environment, unless given) inside its strings replaced by `***`. Only string values change: dict keys, numbers,
    booleans and None are kept, tuples become lists (as JSON and YAML write them). Serialise the result with a YAML or
    JSON writer, never redact serialised text: the writer quotes `***`, which plain YAML would read as an alias."""
    secrets = secret_values() if secrets is None else secrets
    if not secrets:
        return value

    def scrub(item):
        if isinstance(item, str):
            for secret in secrets:
                item = item.replace(secret, REDACTED)
            return item
        if isinstance(item, dict):
            return {key: scrub(inner) for key, inner in item.items()}
        if isinstance(item, (list, tuple)):
            return [scrub(inner) for inner in item]
        return item

    return scrub(value)
