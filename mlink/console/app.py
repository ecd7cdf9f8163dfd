"""The console's ASGI application (Starlette), its pages and forms.

Every page is rendered on the server from Jinja2 templates with
autoescaping; there is no JavaScript. Every POST is checked for the
session's CSRF token (and, when the browser sends one, a same-origin
`Origin`) before anything else; every form is validated here, and a bad
value re-renders the form with the field's message and changes nothing.
Every change is written to the `mlink.console.audit` log: who, what, on
whom, from where (the log line's time says when).

Delegated administration: a session holds the domains its user
administers, and every page or form that names a user checks the user's
domain against them; a user of another domain is "no such user", exactly as
one that does not exist, so editing a URL or a form field reveals nothing.
"""

from __future__ import annotations

import datetime
import logging
import secrets
import unicodedata
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
import trio
from starlette.applications import Starlette
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlink.config_model import Config, RosterGroupConfig
from mlink.console.auth import (
    LOGIN_COOKIE,
    SESSION_COOKIE,
    ConsoleSession,
    SessionStore,
    same_token,
)
from mlink.console.metrics import CONTENT_TYPE_LATEST, render_metrics
from mlink.directory import open_directory
from mlink.directory.base import (
    Directory,
    DirectoryError,
    DirectoryRefused,
    DirectoryUnavailable,
    NoSuchUser,
    UserExists,
)
from mlink.jid import InvalidJID, parse_jid, prep_localpart
from mlink.profile.fields import PHOTO_FIELD, FieldSpec, jid_attribute
from mlink.profile.model import MAX_TEXT_VALUE_CHARS, ProfileError, ProfileService

if TYPE_CHECKING:
    from mlink.shard.supervisor import Supervisor
    from mlink.store import Store

log = logging.getLogger(__name__)
audit = logging.getLogger("mlink.console.audit")

TEMPLATES = Path(__file__).with_name("templates")
# The console's own floor for the passwords it sets in the embedded
# directory, which has no quality rules of its own. An LDAP directory
# decides itself (ppolicy's pwdMinLength, pwdCheckQuality, history), and its
# refusal text is shown: a floor here would hide its rules and words.
MIN_PASSWORD_CHARS = 8
# Users listed per search: the directory may hold many thousands.
MAX_LISTED_USERS = 200
# The reason a kicked client is given unless the administrator writes one.
DEFAULT_KICK_REASON = "ended by an administrator"
# Security headers of every response: no script, nothing framed, nothing cached.
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
     b"frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    # Not no-referrer: with it Chromium sends "Origin: null" on our own
    # forms, and the origin check could not tell them from a foreign page.
    (b"referrer-policy", b"same-origin"),
    (b"cache-control", b"no-store"),
    (b"strict-transport-security", b"max-age=31536000"),
]


class SecurityHeaders:
    """ASGI middleware adding SECURITY_HEADERS to every HTTP response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []),
                                                   *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class FormInvalid(Exception):
    """Bad values in a form: field name -> message."""

    def __init__(self, errors: Mapping[str, str]) -> None:
        super().__init__("; ".join(errors.values()))
        self.errors = dict(errors)


class _ProfileHost:
    """What ProfileService needs, from the console's side."""

    def __init__(self, console: Console) -> None:
        self._console = console

    @property
    def config(self) -> Config:
        return self._console.config

    @property
    def directory(self) -> Directory:
        return self._console.directory

    @property
    def store(self) -> Store:
        assert self._console.store is not None
        return self._console.store

    def changed(self, user: str, what: str) -> None:
        # The shards cache profiles: have them drop this user's copy.
        self._console.supervisor.invalidate(user, "profile")


Handler = Callable[[Request, ConsoleSession], Awaitable[Response]]


class Console:
    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        self.directory = open_directory(supervisor.config.directory)
        self.store: Store | None = None
        console = supervisor.config.console
        self.sessions = SessionStore(console.idle_minutes * 60.0, console.max_hours * 3600.0)
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
        self.templates = Jinja2Templates(env=env)
        self.profiles = ProfileService(_ProfileHost(self))
        self._profile_config: Config = supervisor.config
        # One configuration change at a time: two saves would each start
        # from the same file and the second would undo the first.
        self._settings_lock = trio.Lock()
        routes = [
            Route("/", self.index),
            Route("/console.css", self.stylesheet),
            Route("/login", self.login_page, methods=["GET"]),
            Route("/login", self.login, methods=["POST"]),
            Route("/logout", self.page(self.logout, allow_must_change=True), methods=["POST"]),
            Route("/users", self.admin(self.users), methods=["GET"]),
            Route("/users", self.admin(self.create_user), methods=["POST"]),
            Route("/users/{jid}", self.admin(self.user), methods=["GET"]),
            Route("/users/{jid}/password", self.admin(self.reset_password), methods=["POST"]),
            Route("/users/{jid}/profile", self.admin(self.admin_profile), methods=["POST"]),
            Route("/users/{jid}/disable", self.admin(self.disable_user), methods=["POST"]),
            Route("/users/{jid}/enable", self.admin(self.enable_user), methods=["POST"]),
            Route("/users/{jid}/delete", self.admin(self.delete_user), methods=["POST"]),
            Route("/sessions", self.admin(self.session_page), methods=["GET"]),
            Route("/sessions/kick", self.admin(self.kick), methods=["POST"]),
            Route("/status", self.admin(self.status), methods=["GET"]),
            Route("/groups", self.admin(self.groups), methods=["GET"]),
            Route("/rooms", self.admin(self.rooms), methods=["GET"]),
            Route("/rooms/destroy", self.admin(self.destroy_room), methods=["POST"]),
            Route("/config", self.admin(self.settings_page), methods=["GET"]),
            Route("/config", self.admin(self.save_settings), methods=["POST"]),
            Route("/me", self.page(self.me, allow_must_change=True), methods=["GET"]),
            Route("/me/profile", self.page(self.my_profile), methods=["POST"]),
            Route("/me/password", self.page(self.my_password, allow_must_change=True),
                  methods=["POST"]),
            Route("/metrics", self.metrics),
        ]
        self.app = SecurityHeaders(Starlette(routes=routes, exception_handlers={
            DirectoryUnavailable: self.directory_down,
            HTTPException: self.http_error,
            Exception: self.server_error,
        }))

    @property
    def config(self) -> Config:
        return self.supervisor.config

    async def aclose(self) -> None:
        await self.directory.aclose()
        if self.store is not None:
            await self.store.aclose()

    async def _store(self) -> None:
        if self.store is None:
            from mlink.store import DEFAULT_FILENAME, Store

            self.store = await Store.open(self.config.data_dir / DEFAULT_FILENAME)

    def _password_floor(self) -> int:
        """The console's minimum length: MIN_PASSWORD_CHARS for the
        embedded directory, none where an LDAP directory has its own rules."""
        return MIN_PASSWORD_CHARS if self.config.directory.backend == "embedded" else 1

    def _fields(self) -> dict[str, FieldSpec]:
        """The profile fields under the configuration in force (a reload
        may have changed the policies)."""
        if self._profile_config is not self.config:
            self.profiles.apply_config(self.config)
            self._profile_config = self.config
        return self.profiles.fields

    # -- plumbing -------------------------------------------------------------

    def render(self, request: Request, name: str, session: ConsoleSession | None,
               status_code: int = 200, **context: Any) -> Response:
        flash = getattr(request.state, "flash", None)
        return self.templates.TemplateResponse(
            request, name, {"session": session, "flash": flash, "errors": {},
                            "csrf": session.csrf if session else "",
                            "full_admin": session is not None
                            and session.admin_domains >= set(self.config.domains),
                            **context},
            status_code=status_code)

    def _session(self, request: Request) -> ConsoleSession | None:
        return self.sessions.get(request.cookies.get(SESSION_COOKIE))

    async def _checked_form(self, request: Request, session: ConsoleSession) -> FormData:
        """The POSTed form, after the CSRF and origin checks (403 otherwise)."""
        origin = request.headers.get("origin")
        # HTTP/2 has no Host header: the URL Starlette builds uses
        # :authority or the listener's address.
        if origin is not None and origin != f"https://{request.url.netloc}":
            raise HTTPException(403, "cross-origin request refused")
        form = await request.form(max_files=0, max_fields=64)
        token = form.get("csrf")
        if not isinstance(token, str) or not same_token(token, session.csrf):
            audit.warning("refused: %s sent a %s without a valid CSRF token from %s",
                          session.jid, request.url.path, _client(request))
            raise HTTPException(403, "the form's security token is missing or wrong; "
                                     "reload the page and try again")
        return form

    def page(self, handler: Handler, allow_must_change: bool = False
             ) -> Callable[[Request], Awaitable[Response]]:
        """A page for any logged-in user."""

        async def endpoint(request: Request) -> Response:
            session = self._session(request)
            if session is None:
                if request.method == "POST":
                    raise HTTPException(403, "not logged in, or the session expired")
                return RedirectResponse("/login", 303)
            if session.must_change and not allow_must_change:
                return RedirectResponse("/me", 303)
            request.state.flash, session.flash = session.flash, None
            if request.method == "POST":
                request.state.form = await self._checked_form(request, session)
            return await handler(request, session)

        return endpoint

    def admin(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """A page for administrators only."""

        async def checked(request: Request, session: ConsoleSession) -> Response:
            if not session.is_admin:
                raise HTTPException(403, "this page is for administrators")
            return await handler(request, session)

        return self.page(checked)

    def _managed_user(self, session: ConsoleSession, raw: str) -> str:
        """The bare JID `raw` names, if this administrator manages it; 404
        otherwise, the same answer as for a user that does not exist."""
        try:
            jid = parse_jid(raw)
        except InvalidJID:
            raise HTTPException(404, "no such user") from None
        if not jid.local or jid.resource or not session.manages(str(jid)):
            raise HTTPException(404, "no such user")
        return str(jid)

    def _audit(self, request: Request, session: ConsoleSession, action: str, target: str,
               detail: str = "") -> None:
        audit.info("%s %s %s%s (from %s)", session.jid, action, target,
                   f": {detail}" if detail else "", _client(request))

    # -- error pages ------------------------------------------------------------

    async def directory_down(self, request: Request, exc: Exception) -> Response:
        log.warning("console: directory unavailable: %s", exc)
        return self.render(request, "error.html", self._session(request), 503,
                           title="Directory unavailable",
                           message="The directory cannot be reached right now, so nothing "
                                   "was read or changed. Try again in a moment; if it "
                                   "persists, check the directory server.")

    async def http_error(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        titles = {403: "Not allowed", 404: "Not found", 405: "Not allowed"}
        return self.render(request, "error.html", self._session(request), exc.status_code,
                           title=titles.get(exc.status_code, "Error"), message=exc.detail)

    async def server_error(self, request: Request, exc: Exception) -> Response:
        log.error("console: %s %s failed", request.method, request.url.path, exc_info=exc)
        return self.render(request, "error.html", None, 500, title="Internal error",
                           message="Something went wrong; the server log has the details.")

    # -- login ------------------------------------------------------------------

    async def index(self, request: Request) -> Response:
        session = self._session(request)
        if session is None:
            return RedirectResponse("/login", 303)
        return RedirectResponse("/users" if session.is_admin else "/me", 303)

    async def stylesheet(self, request: Request) -> Response:
        return Response((TEMPLATES / "console.css").read_bytes(), media_type="text/css")

    async def login_page(self, request: Request, error: str = "", status_code: int = 200,
                         jid: str = "") -> Response:
        token = request.cookies.get(LOGIN_COOKIE) or _token()
        response = self.render(request, "login.html", None, status_code, login_token=token,
                                error=error, jid=jid)
        response.set_cookie(LOGIN_COOKIE, token, secure=True, httponly=True,
                            samesite="strict", path="/")
        return response

    async def login(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=8)
        cookie = request.cookies.get(LOGIN_COOKIE)
        token = form.get("login_token")
        if cookie is None or not isinstance(token, str) or not same_token(token, cookie):
            raise HTTPException(403, "the login form's security token is missing or wrong; "
                                     "reload the page and try again")
        address = _client(request)
        raw, password = str(form.get("jid", "")).strip(), str(form.get("password", ""))
        if self.sessions.login_blocked(address):
            return await self.login_page(request, "Too many failed logins from your address; "
                                         "wait a few minutes.", 429, raw)
        try:
            parsed = parse_jid(raw)
            if not parsed.local or parsed.resource or parsed.domain not in self.config.domains:
                raise InvalidJID("not a user of this server")
        except InvalidJID:
            self.sessions.login_failed(address)
            return await self.login_page(request, "Wrong address or password.", 401, raw)
        jid = str(parsed)
        ok, verdict = await self.directory.password_login(jid, password)
        must_change = verdict.condition == "credentials-expired"
        if not ok and not must_change:
            self.sessions.login_failed(address)
            audit.info("login failed for %s (from %s)", jid, address)
            return await self.login_page(request, "Wrong address or password.", 401, raw)
        if verdict.refused and not must_change:
            audit.info("login refused for %s: %s (from %s)", jid, verdict.text, address)
            return await self.login_page(request, f"Login refused: {verdict.text}.", 403, raw)
        self.sessions.login_succeeded(address)
        session = self.sessions.create(jid, await self._admin_domains(jid))
        session.must_change = must_change
        session.notice = verdict.text if must_change else verdict.notice
        audit.info("login %s%s (from %s)", jid, " as administrator of " + ", ".join(
            sorted(session.admin_domains)) if session.is_admin else "", address)
        response = RedirectResponse("/users" if session.is_admin and not must_change
                                    else "/me", 303)
        response.set_cookie(SESSION_COOKIE, session.token, secure=True, httponly=True,
                            samesite="strict", path="/")
        response.delete_cookie(LOGIN_COOKIE, secure=True, httponly=True, samesite="strict")
        return response

    async def _admin_domains(self, jid: str) -> frozenset[str]:
        """The domains `jid` administers under `<console>`'s `<admin>`
        entries: groups are read now, so a membership change applies at
        the next login."""
        served = self.config.domains
        domains: set[str] = set()
        for entry in self.config.console.admins:
            if entry.jid is not None:
                try:
                    member = str(parse_jid(entry.jid)) == jid
                except InvalidJID:
                    member = False
            else:
                groups = await self.directory.roster_groups([RosterGroupConfig(dn=entry.group)])
                member = any(jid in group.members for group in groups)
            if member:
                domains.update([entry.domain] if entry.domain else served)
        return frozenset(domains)

    async def logout(self, request: Request, session: ConsoleSession) -> Response:
        self.sessions.end(session.token)
        audit.info("logout %s (from %s)", session.jid, _client(request))
        response = RedirectResponse("/login", 303)
        response.delete_cookie(SESSION_COOKIE, secure=True, httponly=True, samesite="strict")
        return response

    # -- users ------------------------------------------------------------------

    async def users(self, request: Request, session: ConsoleSession,
                    errors: Mapping[str, str] | None = None, form: Mapping[str, str] | None = None,
                    status_code: int = 200) -> Response:
        query = request.query_params.get("q", "").strip().lower()
        everyone = [j for j in await self.directory.list_users() if session.manages(j)]
        found = [j for j in everyone if query in j.lower()] if query else everyone
        return self.render(request, "users.html", session, status_code, query=query,
                           users=found[:MAX_LISTED_USERS], total=len(found),
                           shown_limit=MAX_LISTED_USERS, domains=sorted(session.admin_domains),
                           errors=errors or {}, form=form or {})

    async def create_user(self, request: Request, session: ConsoleSession) -> Response:
        form = request.state.form
        values = {k: str(form.get(k, "")) for k in ("local", "domain")}
        errors: dict[str, str] = {}
        try:
            local = prep_localpart(values["local"].strip())
            if not local:
                raise InvalidJID("empty")
        except InvalidJID:
            errors["local"] = "Not a valid user name (the part before @)."
            local = ""
        domain = values["domain"]
        if domain not in session.admin_domains:
            errors["domain"] = "Not a domain you administer."
        password = str(form.get("password", ""))
        _check_new_password(password, str(form.get("confirm", "")), errors,
                            self._password_floor())
        jid = f"{local}@{domain}"
        if not errors:
            try:
                await self.directory.add_user(jid, password)
            except UserExists:
                errors["local"] = f"{jid} already exists."
            except DirectoryUnavailable:
                raise
            except DirectoryError as exc:
                errors["password"] = f"The directory refused it: {exc}"
        if errors:
            return await self.users(request, session, errors, values, 400)
        self._audit(request, session, "created user", jid)
        _flash(session, f"Created {jid}.")
        return RedirectResponse(f"/users/{jid}", 303)

    async def user(self, request: Request, session: ConsoleSession,
                   errors: Mapping[str, str] | None = None, status_code: int = 200) -> Response:
        jid = self._managed_user(session, request.path_params["jid"])
        profile_view = await self._profile_view(jid, admin=True)
        if profile_view is None:
            raise HTTPException(404, "no such user")
        verdict = await self.directory.account_verdict(jid)
        listed = await self.supervisor.sessions(jid)
        return self.render(request, "user.html", session, status_code, jid=jid,
                           fields=profile_view, verdict=verdict,
                           sessions=listed["sessions"], errors=errors or {})

    async def _profile_view(self, jid: str, admin: bool) -> list[dict[str, Any]] | None:
        """The user's profile fields for a form: name, policy, value(s),
        and whether this viewer may edit it; None for no such user.
        Administrators edit what the directory holds (`directory` and
        `update`); users what the policy gives them (`update`, `local`)."""
        fields = self._fields()
        if any(spec.policy == "local" for spec in fields.values()):
            await self._store()
        self.profiles.invalidate(jid)
        try:
            profile = await self.profiles.get(jid)
        except ProfileError as exc:
            if exc.condition == "item-not-found":
                return None
            if exc.condition == "service-unavailable":
                raise DirectoryUnavailable(exc.text) from exc
            raise
        identity = {jid_attribute(self.config).lower(), "uid", "objectclass"}
        view = []
        for name, spec in fields.items():
            values = profile.get(name)
            if name == PHOTO_FIELD or spec.binary:
                continue
            editable = spec.policy in (("directory", "update") if admin else ("update", "local"))
            if spec.from_directory and spec.attribute.lower() in identity:
                editable = False  # the user's address and name: not profile data
            text = [v for v in values if isinstance(v, str)]
            view.append({"name": name, "label": name.replace("_", " "),
                         "policy": spec.policy, "all_values": text,
                         "value": text[0] if text else "",
                         "editable": editable and len(text) <= 1})
        return view

    def _profile_changes(self, form: FormData, view: Sequence[Mapping[str, Any]]
                         ) -> dict[str, list[str]]:
        """The edited fields' new values (empty list: cleared); FormInvalid
        with each bad field's message."""
        errors: dict[str, str] = {}
        changes: dict[str, list[str]] = {}
        for row in view:
            if not row["editable"]:
                continue
            raw = form.get(f"field.{row['name']}")
            if not isinstance(raw, str):
                continue
            value = raw.strip()
            if len(value) > MAX_TEXT_VALUE_CHARS:
                errors[row["name"]] = f"At most {MAX_TEXT_VALUE_CHARS} characters."
            elif any(unicodedata.category(c) == "Cc" for c in value):
                errors[row["name"]] = "Control characters are not allowed."
            elif value != row["value"]:
                changes[row["name"]] = [value] if value else []
        if errors:
            raise FormInvalid(errors)
        return changes

    async def admin_profile(self, request: Request, session: ConsoleSession) -> Response:
        jid = self._managed_user(session, request.path_params["jid"])
        view = await self._profile_view(jid, admin=True)
        if view is None:
            raise HTTPException(404, "no such user")
        try:
            changes = self._profile_changes(request.state.form, view)
        except FormInvalid as exc:
            return await self.user(request, session, exc.errors, 400)
        fields = self._fields()
        modify: dict[str, list[bytes]] = {}
        for name, values in changes.items():
            modify[fields[name].attribute] = [v.encode("utf-8") for v in values]
        if modify:
            try:
                await self.directory.modify_user(jid, modify)
            except DirectoryUnavailable:
                raise
            except DirectoryError as exc:
                return await self.user(request, session,
                                       {"profile": f"The directory refused it: {exc}"}, 400)
            finally:
                self.supervisor.invalidate(jid, "profile")
            self._audit(request, session, "changed profile of", jid, ", ".join(sorted(changes)))
            _flash(session, "Profile saved.")
        else:
            _flash(session, "Nothing changed.")
        return RedirectResponse(f"/users/{jid}", 303)

    async def reset_password(self, request: Request, session: ConsoleSession) -> Response:
        jid = self._managed_user(session, request.path_params["jid"])
        form = request.state.form
        errors: dict[str, str] = {}
        password = str(form.get("password", ""))
        _check_new_password(password, str(form.get("confirm", "")), errors,
                            self._password_floor())
        if not errors:
            try:
                await self.directory.set_password(jid, password)
            except NoSuchUser:
                raise HTTPException(404, "no such user") from None
            except DirectoryUnavailable:
                raise
            except DirectoryError as exc:
                errors["password"] = f"The directory refused it: {exc}"
        if errors:
            return await self.user(request, session, errors, 400)
        self.sessions.end_user(jid)
        self._audit(request, session, "reset the password of", jid)
        _flash(session, f"Password of {jid} reset.")
        return RedirectResponse(f"/users/{jid}", 303)

    async def _set_lock(self, request: Request, session: ConsoleSession, lock: bool
                        ) -> Response:
        """Disable (ppolicy's administrative lock, pwdAccountLockedTime
        000001010000Z) or enable a user; a directory without ppolicy
        refuses, and the page says so."""
        jid = self._managed_user(session, request.path_params["jid"])
        try:
            await self.directory.modify_user(
                jid, {"pwdAccountLockedTime": [b"000001010000Z"] if lock else []})
        except NoSuchUser:
            raise HTTPException(404, "no such user") from None
        except DirectoryRefused as exc:
            return await self.user(request, session, {
                "account": f"The directory refused it: {exc}. Disabling needs a directory "
                           "with the password policy overlay (ppolicy)."}, 400)
        if lock:
            self.supervisor.end_user(jid, "your account was disabled")
            self.sessions.end_user(jid)
        self._audit(request, session, "disabled" if lock else "enabled", jid)
        _flash(session, f"{jid} {'disabled' if lock else 'enabled'}.")
        return RedirectResponse(f"/users/{jid}", 303)

    async def disable_user(self, request: Request, session: ConsoleSession) -> Response:
        return await self._set_lock(request, session, True)

    async def enable_user(self, request: Request, session: ConsoleSession) -> Response:
        return await self._set_lock(request, session, False)

    async def delete_user(self, request: Request, session: ConsoleSession) -> Response:
        jid = self._managed_user(session, request.path_params["jid"])
        if request.state.form.get("confirm") != jid:
            return await self.user(request, session,
                                   {"delete": f"Type {jid} to confirm the deletion."}, 400)
        try:
            await self.directory.delete_user(jid)
        except NoSuchUser:
            raise HTTPException(404, "no such user") from None
        self.supervisor.end_user(jid, "your account was deleted", removed=True)
        self.sessions.end_user(jid)
        self._audit(request, session, "deleted user", jid)
        _flash(session, f"Deleted {jid}; their sessions were ended.")
        return RedirectResponse("/users", 303)

    # -- sessions and status ----------------------------------------------------

    async def session_page(self, request: Request, session: ConsoleSession,
                           errors: Mapping[str, str] | None = None) -> Response:
        user = request.query_params.get("user", "").strip() or None
        listed = await self.supervisor.sessions(user)
        rows = [s for s in listed["sessions"]
                if session.manages(str(s.get("jid", "")).split("/", 1)[0])]
        return self.render(request, "sessions.html", session, 400 if errors else 200,
                           sessions=sorted(rows, key=lambda s: (s["jid"], s["shard"])),
                           unanswered=listed["unanswered"], user=user or "",
                           errors=errors or {})

    async def kick(self, request: Request, session: ConsoleSession) -> Response:
        form = request.state.form
        raw = str(form.get("jid", ""))
        reason = str(form.get("reason", "")).strip()[:200] or DEFAULT_KICK_REASON
        try:
            jid = parse_jid(raw)
        except InvalidJID:
            jid = None
        if jid is None or not jid.local or not session.manages(str(jid.bare)):
            return await self.session_page(request, session,
                                           {"jid": "No such session."})
        result = await self.supervisor.kick(str(jid), reason)
        self._audit(request, session, "kicked", str(jid), reason)
        ended = result.get("ended", [])
        _flash(session, f"Ended {len(ended)} session(s): {', '.join(ended)}" if ended
               else "No such session (it may have ended already).")
        return RedirectResponse("/sessions", 303)

    async def groups(self, request: Request, session: ConsoleSession) -> Response:
        """The directory groups that pre-populate rosters (`<rosters>`),
        with their members in this administrator's domains; read-only:
        groups are edited in the directory."""
        specs = self.config.rosters.groups
        found = await self.directory.roster_groups(specs) if specs else []
        rows = [{"name": g.name, "dn": g.key,
                 "members": sorted(m for m in g.members if session.manages(m))}
                for g in found]
        return self.render(request, "groups.html", session, groups=rows,
                           configured=len(specs))

    # -- persistent rooms ---------------------------------------------------------

    def _room_directory(self) -> tuple[Any, dict[str, str]] | None:
        """The persistent rooms in the directory (as `mlink room` reads
        them) and the chat services (service domain -> local domain);
        None when the muc module is not enabled."""
        if "muc" not in self.config.modules:
            return None
        from mlink.modules.muc import service_hosts
        from mlink.modules.muc.options import Options
        from mlink.modules.muc.persist import RoomDirectory, rooms_dn

        options = self.config.module_options.get("muc")
        if not isinstance(options, Options):
            options = Options()
        hosts = service_hosts(options, frozenset(self.config.domains))
        return RoomDirectory(self.directory, rooms_dn(self.directory, options.rooms_dn)), hosts

    async def rooms(self, request: Request, session: ConsoleSession,
                    errors: Mapping[str, str] | None = None) -> Response:
        """Persistent rooms of the chat services of this administrator's
        domains: configuration flags and affiliations; destroy."""
        found = self._room_directory()
        rows: list[dict[str, Any]] = []
        problems: list[str] = []
        if found is not None:
            rooms, hosts = found
            records, problems = await rooms.load()
            for jid, record in sorted(records.items(), key=lambda item: str(item[0])):
                if hosts.get(jid.domain) not in session.admin_domains:
                    continue
                config = record.config
                by_kind: dict[str, list[str]] = {}
                for who, affiliation in sorted(record.affiliations.items()):
                    by_kind.setdefault(affiliation.name.lower(), []).append(who)
                rows.append({
                    "jid": str(jid), "name": config.name, "description": config.description,
                    "flags": [word for on, word in (
                        (config.members_only, "members-only"), (config.moderated, "moderated"),
                        (not config.public, "hidden"), (config.needs_password, "password"),
                        (config.non_anonymous, "non-anonymous")) if on],
                    "affiliations": by_kind, "member_group": config.member_group})
        return self.render(request, "rooms.html", session, 400 if errors else 200,
                           enabled=found is not None, rooms=rows, errors=errors or {},
                           problems=problems if session.admin_domains >= set(
                               self.config.domains) else [])

    async def destroy_room(self, request: Request, session: ConsoleSession) -> Response:
        found = self._room_directory()
        raw = str(request.state.form.get("jid", ""))
        try:
            jid = parse_jid(raw)
        except InvalidJID:
            jid = None
        if found is None or jid is None or not jid.local or jid.resource \
                or found[1].get(jid.domain) not in session.admin_domains:
            return await self.rooms(request, session, {"room": "No such room."})
        if not await found[0].delete(jid):
            return await self.rooms(request, session, {"room": "No such room."})
        self._audit(request, session, "destroyed room", str(jid))
        _flash(session, f"Destroyed {jid}; the server ends it within the directory feed's "
                        "interval.")
        return RedirectResponse("/rooms", 303)

    # -- server configuration ----------------------------------------------------

    def _full_admin(self, session: ConsoleSession) -> None:
        """Server configuration is for administrators of every domain: a
        domain's delegated administrator must not change the server."""
        if not session.admin_domains >= set(self.config.domains):
            raise HTTPException(403, "the server configuration is for administrators of "
                                     "every domain")

    async def settings_page(self, request: Request, session: ConsoleSession,
                            errors: Mapping[str, str] | None = None,
                            submitted: Mapping[str, str] | None = None,
                            result: Mapping[str, Any] | None = None) -> Response:
        self._full_admin(session)
        from mlink.console.settings import build_form
        from mlink.reload import restart_needed

        source = self.config.configuration
        return self.render(
            request, "config.html", session, 400 if errors else 200,
            form=build_form(self.config), errors=errors or {}, submitted=submitted or {},
            result=result, where=(f"the directory entry {source.entry}"
                                  if source.source == "directory"
                                  else str(self.supervisor.config_path)),
            pending=restart_needed(self.supervisor.started_config, self.config),
            refused=self.supervisor.last_reload_error)

    async def save_settings(self, request: Request, session: ConsoleSession) -> Response:
        """Check the changed settings, write them where the configuration
        lives (nothing is written unless all of it loads), and reload."""
        self._full_admin(session)
        from mlink.console.settings import build_form, changes, check_fields

        form = build_form(self.config)
        submitted = {k: v for k, v in request.state.form.items() if isinstance(v, str)}
        changed = changes(form, submitted)
        if not changed:
            _flash(session, "Nothing changed.")
            return RedirectResponse("/config", 303)
        base = self.supervisor.config_path.parent
        errors = check_fields(form, changed, base)
        if not errors:
            async with self._settings_lock:
                errors = await self._write_settings(form, changed)
        if errors:
            return await self.settings_page(request, session, errors, submitted)
        answer = await self.supervisor.reload()
        names = ", ".join(sorted(changed))
        restart = answer.get("restart", [])
        self._audit(request, session, "changed server configuration",
                    self._config_where(), names + (
                        f"; needs a restart: {', '.join(restart)}" if restart else ""))
        return await self.settings_page(request, session, result={
            "changed": sorted(changed), "restart": restart, "ok": answer.get("ok", False),
            "error": answer.get("error")})

    def _config_where(self) -> str:
        source = self.config.configuration
        return (f"entry {source.entry}" if source.source == "directory"
                else str(self.supervisor.config_path))

    async def _write_settings(self, form: Any, changed: Mapping[str, str]
                              ) -> dict[str, str]:
        """Apply `changed` to the configuration's XML and write it, if the
        server's loader accepts the result; the problems otherwise."""
        import os
        from xml.etree.ElementTree import ParseError

        from defusedxml import DefusedXmlException

        from mlink.config import ConfigError
        from mlink.console.settings import (
            apply_changes,
            field_of_problem,
            parse_tree,
            serialise,
            write_candidate,
        )
        from mlink.reload import load_checked

        path = self.supervisor.config_path
        directory_source = self.config.configuration.source == "directory"
        try:
            if directory_source:
                from mlink.admin.config_cli import _standalone
                from mlink.config_render import render_config

                text = render_config(_standalone(self.config), path.parent).encode()
                mode = 0o600  # it may hold the bind password of the bootstrap
            else:
                text = await trio.Path(path).read_bytes()
                mode = os.stat(path).st_mode & 0o7777
            root = parse_tree(text)
        except OSError as exc:
            return {"": f"{path}: cannot read: {exc.strerror or exc}"}
        except (ParseError, DefusedXmlException) as exc:
            # Edited by hand since it was loaded, and broken: not ours to fix.
            return {"": f"{path}: does not parse as XML any more ({exc}); fix the file"}
        apply_changes(root, form, changed)
        try:
            candidate = await trio.to_thread.run_sync(write_candidate, path.parent,
                                                      serialise(root), mode)
        except OSError as exc:
            return {"": f"{path.parent}: cannot write: {exc.strerror or exc}"}
        try:
            try:
                new = await trio.to_thread.run_sync(load_checked, candidate)
            except ConfigError as exc:
                where = field_of_problem(form, changed, exc.problem)
                return {where or "": exc.problem if where else
                        str(exc).replace(str(candidate), str(path))}
            if directory_source:
                problem = await self._import_settings(new, path)
                return {"": problem} if problem else {}
            try:
                target = Path(os.path.realpath(path))
                if target != path.absolute():
                    # A symlinked file (a configuration-management
                    # checkout): replace the file it points to, not the link.
                    os.replace(write_candidate(target.parent, serialise(root), mode), target)
                else:
                    os.replace(candidate, path)
            except OSError as exc:
                return {"": f"{path}: cannot replace: {exc.strerror or exc}"}
        finally:
            candidate.unlink(missing_ok=True)
        return {}

    async def _import_settings(self, new: Config, bootstrap: Path) -> str | None:
        """Write `new` into the directory entry, as `mlink config import`."""
        from mlink.config import ConfigError
        from mlink.config_directory import (
            bootstrap_of,
            build_config,
            config_entries,
            write_entries,
        )

        boot = await trio.to_thread.run_sync(bootstrap_of, bootstrap)
        entries = config_entries(new, boot.source.entry, boot.path.parent)
        try:
            build_config(boot, entries)
        except ConfigError as exc:
            return f"would not load from the directory: {exc.problem}"
        directory = open_directory(boot.directory)
        try:
            await write_entries(directory.port,  # type: ignore[attr-defined]
                                boot.source.entry, entries)
        except DirectoryError as exc:
            return f"cannot write the configuration to the directory: {exc}"
        finally:
            await directory.aclose()
        return None

    async def status(self, request: Request, session: ConsoleSession) -> Response:
        status = await self.supervisor.status()
        return self.render(request, "status.html", session, status=status,
                           duration=_duration)

    # -- self-service -------------------------------------------------------------

    async def me(self, request: Request, session: ConsoleSession,
                 errors: Mapping[str, str] | None = None, status_code: int = 200) -> Response:
        view = [] if session.must_change else await self._profile_view(session.jid, admin=False)
        if view is None:
            self.sessions.end(session.token)
            return RedirectResponse("/login", 303)
        policy = await self.directory.password_status(session.jid)
        return self.render(request, "me.html", session, status_code, fields=view,
                           policy=policy, min_password=self._password_floor(),
                           errors=errors or {}, today=datetime.datetime.now(datetime.UTC))

    async def my_profile(self, request: Request, session: ConsoleSession) -> Response:
        view = await self._profile_view(session.jid, admin=False)
        if view is None:
            raise HTTPException(404, "no such user")
        try:
            changes = self._profile_changes(request.state.form, view)
            if changes:
                await self.profiles.update(session.jid, dict(changes))
        except FormInvalid as exc:
            return await self.me(request, session, exc.errors, 400)
        except ProfileError as exc:
            if exc.condition == "service-unavailable":
                raise DirectoryUnavailable(exc.text) from exc
            return await self.me(request, session, {"profile": exc.text}, 400)
        if changes:
            self._audit(request, session, "changed own profile", session.jid,
                        ", ".join(sorted(changes)))
        _flash(session, "Profile saved." if changes else "Nothing changed.")
        return RedirectResponse("/me", 303)

    async def my_password(self, request: Request, session: ConsoleSession) -> Response:
        form = request.state.form
        errors: dict[str, str] = {}
        current = str(form.get("current", ""))
        password = str(form.get("password", ""))
        ok, verdict = await self.directory.password_login(session.jid, current)
        if not ok and verdict.condition != "credentials-expired":
            errors["current"] = "This is not your current password."
        _check_new_password(password, str(form.get("confirm", "")), errors,
                            self._password_floor())
        if not errors and password == current:
            errors["password"] = "The new password must differ from the current one."
        if not errors:
            try:
                await self.directory.change_own_password(session.jid, password)
            except DirectoryUnavailable:
                raise
            except DirectoryError as exc:
                # The directory's own words: its quality or history rule.
                errors["password"] = f"The directory refused it: {exc}"
        if errors:
            return await self.me(request, session, errors, 400)
        self.sessions.end_user(session.jid)
        fresh = self.sessions.create(session.jid, session.admin_domains)
        self._audit(request, session, "changed own password", session.jid)
        _flash(fresh, "Your password was changed.")
        response = RedirectResponse("/me", 303)
        response.set_cookie(SESSION_COOKIE, fresh.token, secure=True, httponly=True,
                            samesite="strict", path="/")
        return response

    # -- metrics -------------------------------------------------------------------

    async def metrics(self, request: Request) -> Response:
        """OpenMetrics for Prometheus: loopback and `<metrics-client>`
        networks without a login, logged-in administrators otherwise."""
        import ipaddress

        host = _client(request)
        allowed = False
        try:
            address = ipaddress.ip_address(host)
            allowed = address.is_loopback or any(
                address in ipaddress.ip_network(n) for n in self.config.console.metrics_clients)
        except ValueError:
            pass
        if not allowed:
            session = self._session(request)
            if session is None or not session.is_admin:
                return PlainTextResponse("forbidden\n", 403)
        status = await self.supervisor.status()
        return Response(render_metrics(status), media_type=CONTENT_TYPE_LATEST)


def _check_new_password(password: str, confirm: str, errors: dict[str, str],
                        floor: int = MIN_PASSWORD_CHARS) -> None:
    if not password:
        errors["password"] = "A password is required."
    elif len(password) < floor:
        errors["password"] = f"At least {floor} characters."
    elif any(unicodedata.category(c) == "Cc" for c in password):
        errors["password"] = "Control characters are not allowed."
    elif password != confirm:
        errors["confirm"] = "The two passwords differ."


def _flash(session: ConsoleSession, text: str) -> None:
    """One message for the page after a redirect (post/redirect/get)."""
    session.flash = text


def _client(request: Request) -> str:
    return request.client.host if request.client else "?"


def _token() -> str:
    return secrets.token_urlsafe(32)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {seconds:02d}s"

