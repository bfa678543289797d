"""Chat commands: `!prompt <text>`, `!vote <n>` and the moderator commands.

`parse_command` turns one chat message into a `Command`, a `Refusal` (a command word
was recognised but the syntax is wrong, or the sender may not use it), or None
(ordinary chat, or a command meant for another bot). It never raises.

Only the command word is normalised (NFKC, case-insensitive, invisible characters
ignored, so `！ＶＯＴＥ 2` and `!vo\u200bte 2` work); the arguments are kept verbatim
apart from surrounding whitespace: prompt texts are cleaned by `chat.moderation`.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import ClassVar

from chat.events import ChatEvent
from chat.settings import CommandSettings

__all__ = [
    "COMMAND_KINDS",
    "MODERATOR_KINDS",
    "REFUSAL_REASONS",
    "BanPromptCommand",
    "Command",
    "PauseCommand",
    "PromptCommand",
    "Refusal",
    "ResumeCommand",
    "SkipCommand",
    "VetoCommand",
    "VoteCommand",
    "parse_command",
]


@dataclass(frozen=True)
class Command:
    """A parsed chat command; the subclasses carry the arguments."""

    kind: ClassVar[str] = ""
    moderator_only: ClassVar[bool] = False


@dataclass(frozen=True)
class PromptCommand(Command):
    """`!prompt <text>`: suggest a prompt (moderation still to come)."""

    kind: ClassVar[str] = "prompt"
    text: str = ""


@dataclass(frozen=True)
class VoteCommand(Command):
    """`!vote <n>`: vote for option n (1-based) of the open round."""

    kind: ClassVar[str] = "vote"
    option: int = 1


@dataclass(frozen=True)
class SkipCommand(Command):
    """`!skip` (moderators): leave the current prompt now."""

    kind: ClassVar[str] = "skip"
    moderator_only: ClassVar[bool] = True


@dataclass(frozen=True)
class VetoCommand(Command):
    """`!veto [n]` (moderators): veto option n of the round, or (no number) what is playing."""

    kind: ClassVar[str] = "veto"
    moderator_only: ClassVar[bool] = True
    option: int | None = None  # None: the prompt playing (or next), not a round option

    @property
    def target(self) -> int | None:
        """The vetoed option number, None for the current prompt."""
        return self.option


@dataclass(frozen=True)
class PauseCommand(Command):
    """`!pause` (moderators): stop taking suggestions and votes."""

    kind: ClassVar[str] = "pause"
    moderator_only: ClassVar[bool] = True


@dataclass(frozen=True)
class ResumeCommand(Command):
    """`!resume` (moderators): take suggestions and votes again."""

    kind: ClassVar[str] = "resume"
    moderator_only: ClassVar[bool] = True


@dataclass(frozen=True)
class BanPromptCommand(Command):
    """`!banprompt <text>` (moderators): refuse this prompt from now on."""

    kind: ClassVar[str] = "banprompt"
    moderator_only: ClassVar[bool] = True
    text: str = ""


@dataclass(frozen=True)
class Refusal:
    """A command that was recognised but cannot be run; `message` is meant for a chat reply."""

    reason: str  # one of REFUSAL_REASONS
    message: str
    kind: str = ""  # the command that was attempted


_CLASSES: dict[str, type[Command]] = {
    cls.kind: cls
    for cls in (PromptCommand, VoteCommand, SkipCommand, VetoCommand, PauseCommand, ResumeCommand,
                BanPromptCommand)
}
COMMAND_KINDS: tuple[str, ...] = tuple(_CLASSES)
MODERATOR_KINDS: frozenset[str] = frozenset(k for k, c in _CLASSES.items() if c.moderator_only)
REFUSAL_REASONS: frozenset[str] = frozenset({"bad_syntax", "bad_option", "not_allowed"})

_MAX_HEAD = 64  # a first word longer than this is not a command
_MENTION = re.compile(r"@[A-Za-z0-9_]{1,25}\s+")  # a Twitch reply starts with "@login "
_TAG_BASE = "\U000e0000"  # unassigned; chat clients append it to dodge Twitch's duplicate filter
# An option number: any Unicode decimal digits (`٣`, `३`; NFKC already made `２` and `𝟐` plain).
_NUMBER = re.compile(r"#?(\d{1,6})")
_SPACE = re.compile(r"\s")
# id(settings) -> (settings, its prefix normalised, command word -> kind)
_WORDS: dict[int, tuple[CommandSettings, str, dict[str, str]]] = {}


def _drop_format_chars(text: str) -> str:
    """Remove invisible format/control characters (zero-width, bidi controls, tag characters)."""
    if text.isascii() and text.isprintable():
        return text
    return "".join(ch for ch in text
                   if ch != _TAG_BASE and unicodedata.category(ch) not in ("Cf", "Cc", "Cs", "Co"))


def _words(settings: CommandSettings) -> tuple[str, dict[str, str]]:
    """The prefix (NFKC, casefolded) and command word -> kind; built once per settings object."""
    cached = _WORDS.get(id(settings))
    if cached is not None and cached[0] is settings:  # every chat message asks: no rebuilding
        return cached[1], cached[2]
    names: dict[str, str] = {}
    for kind in COMMAND_KINDS:
        for name in getattr(settings, kind):
            names.setdefault(name.casefold(), kind)
    prefix = unicodedata.normalize("NFKC", settings.prefix).casefold()
    if len(_WORDS) > 64:
        _WORDS.clear()
    _WORDS[id(settings)] = (settings, prefix, names)
    return prefix, names


def _usage(kind: str, settings: CommandSettings, vote_options: int) -> str:
    word = f"{settings.prefix}{getattr(settings, kind)[0]}"
    return {
        "prompt": f"usage: {word} <text>",
        "vote": f"usage: {word} <1-{vote_options}>",
        "veto": f"usage: {word} [1-{vote_options}]",
        "banprompt": f"usage: {word} <text>",
    }.get(kind, f"usage: {word}")


def _option(arg: str) -> int | None:
    """The option number `arg` starts with ("2", "#2", "２", "٣", "2!", "2 that one!"), or None.

    The first word, less trailing punctuation, must be the number ("2nd", "1.5" are not); words after it
    are ignored unless the next one is a number too ("2 3" is ambiguous).
    """
    if not (arg.isascii() and arg.isprintable()):
        arg = unicodedata.normalize("NFKC", _drop_format_chars(arg))
    words = arg.split(maxsplit=2)
    numbers = [_NUMBER.fullmatch(_strip_punctuation(w)) for w in words[:2]]
    if not numbers or numbers[0] is None or (len(numbers) == 2 and numbers[1] is not None):
        return None
    return int(numbers[0].group(1))


def _strip_punctuation(word: str) -> str:
    end = len(word)
    while end > 0 and unicodedata.category(word[end - 1])[0] == "P":
        end -= 1
    return word[:end]


def _has_visible(arg: str) -> bool:
    return any(not ch.isspace() for ch in _drop_format_chars(arg))


def parse_command(event: ChatEvent, settings: CommandSettings, *,
                  vote_options: int = 4) -> Command | Refusal | None:
    """The command in `event.text`; None for ordinary chat and unknown `!words`.

    `vote_options` is the number of options a round has (`chat.vote.options`), for the
    range check and the usage text of `!vote` and `!veto`.
    """
    text = event.text if isinstance(event.text, str) else ""
    text = text.lstrip()
    mention = _MENTION.match(text)
    if mention:
        text = text[mention.end():]
    space = _SPACE.search(text, 0, _MAX_HEAD + 1)
    head_end = space.start() if space else len(text)
    if head_end > _MAX_HEAD:
        return None
    head = text[:head_end]
    if not (head.isascii() and head.isprintable()):
        head = unicodedata.normalize("NFKC", _drop_format_chars(head))
    head = head.casefold()
    prefix, names = _words(settings)
    if not head.startswith(prefix):
        return None
    kind = names.get(head[len(prefix):])
    if kind is None:
        return None
    cls = _CLASSES[kind]
    if cls.moderator_only and not event.is_moderator:
        return Refusal("not_allowed", f"{settings.prefix}{getattr(settings, kind)[0]} is for moderators",
                       kind)
    arg = text[head_end:].strip()

    if kind in ("prompt", "banprompt"):
        if not _has_visible(arg):
            return Refusal("bad_syntax", _usage(kind, settings, vote_options), kind)
        return cls(text=arg)  # type: ignore[call-arg]
    if kind == "vote" or (kind == "veto" and _has_visible(arg)):
        option = _option(arg)
        if option is None:
            return Refusal("bad_syntax", _usage(kind, settings, vote_options), kind)
        if not 1 <= option <= vote_options:
            return Refusal("bad_option", f"choose an option from 1 to {vote_options}", kind)
        return VoteCommand(option=option) if kind == "vote" else VetoCommand(option=option)
    return cls()  # skip, pause, resume (trailing words are ignored), veto without a number
