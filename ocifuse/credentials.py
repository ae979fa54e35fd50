"""Where a remote archive's credentials come from: HTTP basic or bearer, and S3 the AWS tools' way.

Pure and synchronous (files and the environment in, values out); remote.py hands what is found
here to its client. Never a secret on the command line: HTTP credentials come from the URL's
userinfo, a file named by ``-o credentials=PATH`` or ``~/.netrc``; S3's from the environment or
the AWS CLI's files (``~/.aws/credentials``, ``~/.aws/config``), which object_store does not read.
"""

from __future__ import annotations

import base64
import configparser
import netrc
import os
import re
import stat
from collections.abc import Mapping
from urllib.parse import unquote, urlsplit

from .errors import OcifuseError

# RFC 6750 2.1: b64token = 1*( ALPHA / DIGIT / "-" / "." / "_" / "~" / "+" / "/" ) *"="
_B64TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
# What an AWS CLI profile may use instead of static keys; ocifuse runs none of them.
_INDIRECT = ("credential_process", "sso_session", "sso_start_url", "role_arn", "web_identity_token_file")


class CredentialsError(OcifuseError):
    """A credentials file that cannot be used (unreadable, readable by others, malformed)."""


def check_private(path: str) -> None:
    """Refuse a secrets file that others may read or that another user owns (as ssh refuses a key)."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise CredentialsError(f"{path}: {e.strerror or e}") from e
    if not stat.S_ISREG(st.st_mode):
        raise CredentialsError(f"{path}: not a regular file")
    if st.st_uid not in (os.geteuid(), 0):
        raise CredentialsError(f"{path}: owned by another user (uid {st.st_uid}); it holds secrets")
    if st.st_mode & 0o077:
        raise CredentialsError(
            f"{path}: readable by others (mode {stat.S_IMODE(st.st_mode):04o}); "
            "it holds secrets: chmod 600 it"
        )


def basic(user: str, password: str) -> str:
    """The ``Authorization`` value of HTTP basic authentication (RFC 7617: UTF-8 user:password)."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def read_credentials_file(path: str) -> str:
    """The ``Authorization`` value a ``-o credentials=`` file holds.

    The file holds one line: ``USER:PASSWORD`` (basic authentication, as ``curl -u`` takes it; the
    password may hold ``:``), or ``Bearer TOKEN`` (RFC 6750). It must be private (mode 0600 or
    stricter, owned by this user or root).
    """
    check_private(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 * 1024)
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialsError(f"{path}: {getattr(e, 'strerror', None) or e}") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise CredentialsError(f"{path}: wants one line, USER:PASSWORD or Bearer TOKEN")
    line = lines[0]
    scheme, _, token = line.partition(" ")
    if scheme.lower() == "bearer":
        token = token.strip()
        if not _B64TOKEN.fullmatch(token):
            raise CredentialsError(f"{path}: a bearer token is letters, digits and -._~+/ (RFC 6750)")
        return f"Bearer {token}"
    user, colon, password = line.partition(":")
    if not colon or not user:
        raise CredentialsError(f"{path}: wants one line, USER:PASSWORD or Bearer TOKEN")
    return basic(user, password)


def netrc_path(env: Mapping[str, str]) -> str:
    """The netrc file curl reads: ``$NETRC``, else ``~/.netrc``."""
    return env.get("NETRC") or os.path.join(_home(env), ".netrc")


def netrc_authorization(host: str, env: Mapping[str, str]) -> str | None:
    """Basic credentials for ``host`` from the netrc file (its ``machine``, else its ``default``)."""
    path = netrc_path(env)
    if not os.path.exists(path):
        return None
    try:
        entry = netrc.netrc(path).authenticators(host)
    except netrc.NetrcParseError as e:
        raise CredentialsError(f"{path}: line {e.lineno}: {e.msg}") from e
    except OSError as e:
        raise CredentialsError(f"{path}: {e.strerror or e}") from e
    if entry is None:
        return None
    login, _, password = entry
    check_private(path)  # only a file that is used must be private
    return basic(login or "", password or "")


def authorization(
    url: str, *, credentials: str | None, origin: str | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """The ``Authorization`` header an http(s) request for ``url`` carries, or None.

    First the URL's own userinfo, then the ``credentials`` file, then the netrc file. The
    credentials file is for the URL the user named: ``origin`` is that URL, and after a redirect to
    another scheme, host or port, only that host's netrc entry counts (as curl does).
    """
    env = os.environ if env is None else env
    parts = urlsplit(url)
    if parts.username is not None:
        return basic(unquote(parts.username), unquote(parts.password or ""))
    if credentials and (origin is None or _origin(origin) == _origin(url)):
        return read_credentials_file(credentials)
    return netrc_authorization(parts.hostname or "", env)


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme.lower())
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


# -- S3, the AWS CLI's way ---------------------------------------------------------------------------


def _home(env: Mapping[str, str]) -> str:
    return env.get("HOME") or os.path.expanduser("~")


def _expand(path: str, env: Mapping[str, str]) -> str:
    return _home(env) + path[1:] if path == "~" or path.startswith("~/") else path


def _sections(path: str) -> configparser.RawConfigParser | None:
    if not os.path.exists(path):
        return None
    parser = configparser.RawConfigParser(strict=False, default_section="\0none")
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, UnicodeDecodeError) as e:
        raise CredentialsError(f"{path}: {getattr(e, 'strerror', None) or e}") from e
    except configparser.Error as e:
        raise CredentialsError(f"{path}: {e.message.splitlines()[0]}") from e
    return parser


def aws_settings(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """What S3's client needs of the AWS CLI's files that the environment does not already say.

    object_store reads ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``,
    ``AWS_REGION``/``AWS_DEFAULT_REGION`` and the endpoint variables itself; it does not read
    ``AWS_PROFILE`` nor ``~/.aws``. As the AWS CLI: the profile is ``AWS_PROFILE`` (else
    ``default``); its keys come from the credentials file's ``[NAME]``, else the config file's
    ``[profile NAME]`` (``[default]`` for the default profile); keys in the environment win over
    both; ``region`` and ``endpoint_url`` come from the config file's section. Returns S3Config
    keys: ``access_key_id``, ``secret_access_key``, ``session_token``, ``region``, ``endpoint``.
    """
    env = os.environ if env is None else env
    named = env.get("AWS_PROFILE") or env.get("AWS_DEFAULT_PROFILE")
    profile = named or "default"
    config_path = _expand(env.get("AWS_CONFIG_FILE") or "~/.aws/config", env)
    creds_path = _expand(env.get("AWS_SHARED_CREDENTIALS_FILE") or "~/.aws/credentials", env)
    config, creds = _sections(config_path), _sections(creds_path)
    # The config file names a profile "profile NAME", except the default one (AWS CLI, "Configuration
    # and credential file settings"); the credentials file names it plainly.
    config_names = ["default", "profile default"] if profile == "default" else [f"profile {profile}"]
    from_config: dict[str, str] = {}
    for name in config_names:
        if config is not None and config.has_section(name):
            from_config = dict(config.items(name))
            break
    from_creds = dict(creds.items(profile)) if creds is not None and creds.has_section(profile) else {}
    if named and not from_config and not from_creds:
        raise CredentialsError(f"AWS profile {named!r} is in neither {config_path} nor {creds_path}")
    out: dict[str, str] = {}
    if not (env.get("AWS_ACCESS_KEY_ID") and env.get("AWS_SECRET_ACCESS_KEY")):
        for source in (from_creds, from_config):
            if source.get("aws_access_key_id") and source.get("aws_secret_access_key"):
                out["access_key_id"] = source["aws_access_key_id"]
                out["secret_access_key"] = source["aws_secret_access_key"]
                if source.get("aws_session_token"):
                    out["session_token"] = source["aws_session_token"]
                break
        else:
            indirect = [k for k in _INDIRECT if k in from_config or k in from_creds]
            if indirect:
                raise CredentialsError(
                    f"AWS profile {profile!r} gets its keys by {indirect[0]}, which ocifuse does not run: "
                    "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (aws configure export-credentials)"
                )
    if not (env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")) and from_config.get("region"):
        out["region"] = from_config["region"]
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if not endpoint and from_config.get("endpoint_url"):
        out["endpoint"] = from_config["endpoint_url"]
    return out
