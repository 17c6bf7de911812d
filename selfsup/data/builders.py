"""Builders of the audio demo's raw data, from the system's packages alone (no download of a data set):

- ``build_spoken_digits``: a labelled spoken-digit set ("zero".."nine") synthesised with espeak-ng, train and
  test in DISJOINT voices, so that a probe cannot win by voice alone;
- ``build_speech_corpus``: ~7 h of real, unlabelled English/Czech/Spanish speech from four Debian packages.

Each writes a plain folder of audio files plus a CSV that ``selfsup shards write audio-folder DIR OUT
--labels CSV`` reads; the CSV is written last, so a folder with its CSV is complete and is reused as it is.
A missing tool raises ``MissingTool``, a failed build ``BuildError``: one line each, naming what to do.
"""

from __future__ import annotations

import csv
import os
import random
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from selfsup.errors import OneLineError

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
DIGIT_ACCENTS = [
    "en-us",
    "en-gb",
    "en-gb-scotland",
    "en-gb-x-gbclan",
    "en-gb-x-gbcwmd",
    "en-gb-x-rp",
    "en-029",
    "en-us-nyc",
]
DIGIT_SPEEDS, DIGIT_PITCHES = (120, 220), (20, 80)  # words per minute, espeak-ng pitch 0-99
DIGITS_CSV = "labels.csv"  # path,label,split,voice,speed,pitch
SPEECH_CSV = "metadata.csv"  # path,source,speaker,language
SPEECH_PACKAGES = [
    "flight-of-the-amazon-queen",
    "fillets-ng-data-cs",
    "asterisk-core-sounds-en-wav",
    "asterisk-core-sounds-es-wav",
]
_ASTERISK = (("en", "en_US_f_Allison"), ("es", "es_MX_f_Allison"))


class MissingTool(OneLineError, RuntimeError):
    """A program a builder runs is not installed; the message names the Debian package to install."""


class BuildError(OneLineError, RuntimeError):
    """A builder's program failed; the message names the step and its last line of output."""


def require_tool(program: str, fix: str) -> str:
    """The path of ``program``, or MissingTool saying ``fix`` (what to install)."""
    path = shutil.which(program)
    if path is None:
        raise MissingTool(f"{program} is not installed: {fix}")
    return path


def _run(cmd: list[str], step: str, cwd: Path | None = None) -> None:
    """Run ``cmd``; a non-zero exit raises BuildError naming ``step`` and the last line it printed."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or [f"exit status {done.returncode}"]
        raise BuildError(f"{step} failed: {lines[-1]}")


def espeak_variants(espeak: str) -> list[str]:
    """espeak-ng's voice variants (the names in its ``voices/!v`` folder), sorted."""
    version = subprocess.run([espeak, "--version"], capture_output=True, text=True).stdout
    folders = [
        Path(version.split("Data at:")[-1].strip()),
        Path("/usr/lib/x86_64-linux-gnu/espeak-ng-data"),
        Path("/usr/share/espeak-ng-data"),
    ]
    for folder in folders:
        if (folder / "voices" / "!v").is_dir():
            return sorted(os.listdir(folder / "voices" / "!v"))
    raise BuildError(
        f"espeak-ng has no voice variants (no voices/!v under {folders[0]}): "
        "sudo apt-get install --reinstall espeak-ng-data"
    )


def digit_jobs(per_class: int, variants: list[str], seed: int = 0) -> list[dict]:
    """The clips to synthesise: ``per_class`` a digit, every 5th one a test clip. A voice is an accent
    + a variant; every 4th variant (sorted) is held out for test, so train and test voices never meet.
    Accent, variant, speed and pitch are drawn from ``random.Random(seed)`` in that order, clip by clip."""
    rng = random.Random(seed)
    test_variants = set(sorted(variants)[::4])
    jobs = []
    for label, word in enumerate(DIGIT_WORDS):
        for i in range(per_class):
            split = "test" if i % 5 == 0 else "train"
            pool = [v for v in sorted(variants) if (v in test_variants) == (split == "test")]
            voice = f"{rng.choice(DIGIT_ACCENTS)}+{rng.choice(pool)}"
            jobs.append(
                {
                    "path": f"clips/{label:d}{i:05d}.wav",
                    "label": label,
                    "split": split,
                    "voice": voice,
                    "speed": rng.randint(*DIGIT_SPEEDS),
                    "pitch": rng.randint(*DIGIT_PITCHES),
                    "word": word,
                }
            )
    return jobs


def build_spoken_digits(out: str | Path, per_class: int = 200, seed: int = 0, processes: int | None = None) -> int:
    """``out/clips/<id>.wav`` (22,050 Hz mono 16-bit, 0.3-1.5 s, as espeak-ng writes them) and
    ``out/labels.csv`` (path,label,split,voice,speed,pitch; label 0-9, split train|test): 10 x ``per_class``
    clips (see ``digit_jobs``), synthesised by ``processes`` espeak-ng processes at a time (default: one a
    core). About 10 s per 1,000 clips on 2 cores. Returns the number of clips."""
    espeak = require_tool("espeak-ng", "sudo apt-get install espeak-ng")
    out = Path(out)
    (out / "clips").mkdir(parents=True, exist_ok=True)
    jobs = digit_jobs(per_class, espeak_variants(espeak), seed)

    def synthesise(job: dict) -> None:
        _run(
            [
                espeak,
                "-v",
                job["voice"],
                "-s",
                str(job["speed"]),
                "-p",
                str(job["pitch"]),
                "-w",
                str(out / job["path"]),
                job["word"],
            ],
            f"espeak-ng -v {job['voice']} {job['word']!r}",
        )

    with ThreadPoolExecutor(processes or os.cpu_count() or 1) as pool:
        list(pool.map(synthesise, jobs))
    _write_csv(out / DIGITS_CSV, ["path", "label", "split", "voice", "speed", "pitch"], jobs)
    return len(jobs)


def _write_csv(path: Path, fields: list[str], rows: list[dict]) -> None:
    """``rows`` (their ``fields``) to ``path`` via a temporary file, so the CSV appears only when complete."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def build_speech_corpus(out: str | Path) -> int:
    """``out/clips/{fotaq,fillets-cs,asterisk-en,asterisk-es}/...`` and ``out/metadata.csv``
    (path,source,speaker,language) from the Debian packages ``SPEECH_PACKAGES``, fetched with
    ``apt-get download`` (``apt-get update`` first when that fails) and unpacked with ``dpkg-deb``:
    6,745 English game-dialogue MP3s (11,025 Hz), 1,782 Czech OGGs (22.05/44.1 kHz, some stereo), 568 + 527
    English/Spanish telephone prompts (8 kHz WAV). Formats and rates stay as shipped (ingestion resamples).
    Licences: FOTAQ freeware, Fish Fillets GPL-2, Asterisk prompts CC-BY-SA-3.0. About a minute, 130 MB.
    Returns the number of clips."""
    debian = f"the speech corpus is unpacked from the Debian packages {' '.join(SPEECH_PACKAGES)} (Debian or Ubuntu)"
    apt, dpkg = require_tool("apt-get", debian), require_tool("dpkg-deb", debian)
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="speech-corpus-") as tmp:
        work = Path(tmp)
        download = [apt, "download", *SPEECH_PACKAGES]
        try:
            _run(download, "apt-get download " + " ".join(SPEECH_PACKAGES), cwd=work)
        except BuildError as err:
            if os.geteuid() != 0:
                raise BuildError(f"{err}; when the package lists are stale: sudo apt-get update") from None
            _run([apt, "update"], "apt-get update")
            _run(download, "apt-get download " + " ".join(SPEECH_PACKAGES), cwd=work)
        for deb in sorted(work.glob("*.deb")):
            _run([dpkg, "-x", str(deb), str(work / "x")], f"dpkg-deb -x {deb.name}")
        rows = _fotaq_clips(work / "x", out) + _fillets_clips(work / "x", out) + _asterisk_clips(work / "x", out)
    _write_csv(out / SPEECH_CSV, ["path", "source", "speaker", "language"], rows)
    return len(rows)


def _put(out: Path, rel: str, data: bytes | None = None, copy_from: Path | None = None, **meta) -> dict:
    """Write ``data`` (or copy ``copy_from``) to ``out/rel``; the clip's metadata row."""
    dst = out / rel
    dst.parent.mkdir(parents=True, exist_ok=True)
    if data is not None:
        dst.write_bytes(data)
    elif copy_from is not None:
        shutil.copyfile(copy_from, dst)
    else:
        raise ValueError(f"{rel}: give its data or the file to copy")
    return {"path": rel, **meta}


def _fotaq_clips(src: Path, out: Path) -> list[dict]:
    """Flight of the Amazon Queen's speech: its one container file is a table of (name, bundle, offset,
    size) entries, whose ``*.SB`` entries are plain MP3 streams. JOE* / ??????J* are the hero, ??????P* the
    other speaker."""
    container = src / "usr/share/scummvm/flight-of-the-amazon-queen/queen.1c"
    blob = container.read_bytes()
    if blob[:4] != b"QTBL":
        raise BuildError(f"{container}: unexpected header {blob[:4]!r} (not a QTBL table); the package changed")
    rows = []
    for i in range(struct.unpack(">H", blob[13:15])[0]):
        entry = blob[15 + 21 * i : 36 + 21 * i]
        name = entry[:12].split(b"\0")[0].decode("ascii")
        offset, size = struct.unpack(">II", entry[13:21])
        if not name.endswith(".SB"):
            continue
        stem = name[:-3]
        hero = stem.startswith("JOE") or (len(stem) > 6 and stem[6] == "J")
        speaker = "joe" if hero else "other" if len(stem) > 6 and stem[6] == "P" else ""
        rows.append(
            _put(
                out,
                f"clips/fotaq/{stem}.mp3",
                data=blob[offset : offset + size],
                source="fotaq",
                speaker=speaker,
                language="en",
            )
        )
    return rows


def _fillets_clips(src: Path, out: Path) -> list[dict]:
    """Fish Fillets NG's Czech dialogue: ``sound/<level>/cs/<level>-<speaker>-<word>.ogg``."""
    root, rows = src / "usr/share/games/fillets-ng/sound", []
    for level in sorted(os.listdir(root)):
        folder = root / level / "cs"
        if not folder.is_dir():
            continue
        for name in sorted(os.listdir(folder)):
            if name.endswith(".ogg"):
                parts = name[:-4].split("-")
                rows.append(
                    _put(
                        out,
                        f"clips/fillets-cs/{name}",
                        copy_from=folder / name,
                        source="fillets-cs",
                        speaker=parts[1] if len(parts) > 2 else "",
                        language="cs",
                    )
                )
    return rows


def _asterisk_clips(src: Path, out: Path) -> list[dict]:
    """Asterisk's telephone prompts: one speaker (Allison Smith), English and Spanish."""
    rows = []
    for lang, folder in _ASTERISK:
        root = src / "usr/share/asterisk/sounds" / folder
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                if name.endswith(".wav"):
                    rel = os.path.relpath(os.path.join(dirpath, name), root)
                    rows.append(
                        _put(
                            out,
                            f"clips/asterisk-{lang}/{rel}",
                            copy_from=Path(dirpath) / name,
                            source=f"asterisk-{lang}",
                            speaker="allison",
                            language=lang,
                        )
                    )
    return rows


def write_fashion_mnist_shards(out: str | Path, download: bool, per_shard: int) -> None:
    """Fashion-MNIST's train and test splits as shards in ``out/train`` and ``out/test``."""
    from selfsup.data import shards, sources

    folder = sources.find_fashion_mnist(Path(out) / "download" if download else None)
    for split in ("train", "test"):
        samples, n = sources.fashion_mnist_samples(split, folder)
        shards.write_shards(
            samples,
            Path(out) / split,
            split=split,
            classes=sources.FASHION_MNIST_CLASSES,
            total=n,
            samples_per_shard=per_shard,
            source=f"fashion-mnist {folder}",
        )


def write_audio_folder_shards(
    root: str | Path, out: str | Path, labels: str | None, per_shard: int, split: str = "train"
) -> list[tuple[Path, dict]]:
    """A folder of audio clips as 16 kHz FLAC shards: one split in ``out``, or one folder ``out/<split>``
    per value of the ``labels`` CSV's split column. (folder, manifest) of each written."""
    from selfsup.data import shards, sources

    splits = sources.audio_label_splits(labels)
    written = []
    for name in splits or [split]:
        samples, n, classes = sources.audio_folder_samples(root, labels, name if splits else None)
        dest = Path(out) / name if splits else Path(out)
        written.append(
            (
                dest,
                shards.write_shards(
                    samples,
                    dest,
                    split=name,
                    kind="audio",
                    classes=classes,
                    total=n,
                    samples_per_shard=per_shard,
                    source=f"audio folder {root}",
                ),
            )
        )
    return written
