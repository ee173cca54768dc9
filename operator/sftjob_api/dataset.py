"""`SFTJob.spec.dataset`: the training (and held-out) data, its sources and their mixture, and curation.
The CRD schema is generated from these models (every docstring becomes a description)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Literal

from pydantic import Field

from .base import ApiModel, CelRule

# s3://bucket/key, an absolute path (e.g. a PVC mounted into the pod), pvc://claim/path, a path relative to
# the manifest's directory starting with ./ or ../ (only meaningful for `sftjob run`), or for models a bare
# model-cache name such as "smollm2-135m-instruct".
DATA_URI = (
    r"^(s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/.*|/.*"
    r"|\.{1,2}/.*)$"
)
DataUri = Annotated[str, Field(pattern=DATA_URI, max_length=1024)]


class FieldMapping(ApiModel):
    """Column names in the dataset when they differ from the format's defaults."""

    instruction: str = Field(default="instruction", max_length=128)
    """alpaca: the instruction column."""
    input: str = Field(default="input", max_length=128)
    """alpaca: the optional input/context column."""
    output: str = Field(default="output", max_length=128)
    """alpaca: the response column (the only part trained on)."""
    messages: str = Field(default="messages", max_length=128)
    """messages: the column holding the list of {role, content} turns."""
    prompt: str = Field(default="prompt", max_length=128)
    """prompt_completion: the prompt column."""
    completion: str = Field(default="completion", max_length=128)
    """prompt_completion: the completion column (the only part trained on)."""


class FilterSpec(ApiModel):
    """Rows dropped before training; the trainer reports how many and why."""

    min_tokens: int = Field(default=1, ge=1, le=1_000_000)
    """Drop samples with fewer tokens than this (prompt + response)."""
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    """Drop samples longer than this instead of truncating them."""
    dedup: bool = True
    """Drop exact duplicate samples."""

    cel_rules = (
        CelRule(
            cel="!has(self.maxTokens) || self.maxTokens >= self.minTokens",
            message="maxTokens must be >= minTokens",
            check=lambda f: f.max_tokens is None or f.max_tokens >= f.min_tokens,
            field_path=".maxTokens",
        ),
    )


DatasetFormat = Literal["alpaca", "messages", "prompt_completion"]
SOURCE_NAME = r"^[a-z0-9]([-a-z0-9_]*[a-z0-9])?$"


class DataSource(ApiModel):
    """One source of a dataset mixture: its files, their format, and its share of the training samples."""

    name: str = Field(pattern=SOURCE_NAME, max_length=63)
    """Source name, unique in the mixture (used in the data report, metrics and error messages)."""
    files: list[DataUri] = Field(min_length=1, max_length=64)
    """The source's files: s3://bucket/key or paths (JSONL or Parquet, chosen by extension)."""
    format: DatasetFormat | None = None
    """Row format of these files; dataset.format when unset."""
    field_mapping: FieldMapping | None = None
    """Column names of these files; dataset.fieldMapping when unset."""
    weight: float | None = Field(default=None, gt=0, le=1)
    """Fraction of the training *samples* (rows after curation, before packing) drawn from this source.
    Either every source has a weight (summing to 1) or none does. Rows are never repeated: the mixture is
    as large as the scarcest source allows, the other sources are subsampled (seeded)."""
    samples: int | None = Field(default=None, ge=1, le=100_000_000)
    """A fixed number of training samples from this source (repeated, seeded, when it has fewer rows);
    exclusive with weight. Without weight or samples a source contributes all its curated rows."""

    cel_rules = (
        CelRule(
            cel="!(has(self.weight) && has(self.samples))",
            message="set either weight or samples, not both",
            check=lambda s: s.weight is None or s.samples is None,
            field_path=".samples",
        ),
    )


class NearDuplicateSpec(ApiModel):
    """Near-duplicate removal: MinHash LSH (datasketch) over word n-gram shingles, confirmed by exact Jaccard."""

    threshold: float = Field(default=0.9, ge=0.5, le=1)
    """Rows whose shingle sets have Jaccard similarity >= this are one cluster; the first row is kept."""
    shingle_size: int = Field(default=5, ge=1, le=32)
    """Words per shingle."""
    num_perm: int = Field(default=128, ge=16, le=1024)
    """MinHash permutations (more: fewer missed pairs, slower)."""


class DecontaminationSpec(ApiModel):
    """Drop training rows that contain the eval set's prompts or answers (word n-gram overlap)."""

    ngram: int = Field(default=8, ge=3, le=50)
    """n-gram size in words; eval prompts/answers shorter than this are not checked."""
    threshold: float = Field(default=0.5, gt=0, le=1)
    """A training row is contaminated when it contains at least this fraction of one eval prompt's or
    answer's n-grams."""


class PerplexitySpec(ApiModel):
    """Drop rows whose answer the base model finds least likely (garbage, wrong language, broken text)."""

    max_perplexity: float | None = Field(default=None, gt=1, le=1e9)
    """Drop rows whose answer-token perplexity under the base model exceeds this value."""
    percentile: float | None = Field(default=None, gt=0, lt=100)
    """Drop rows above this percentile of answer-token perplexity (e.g. 95 drops the worst 5%)."""

    cel_rules = (
        CelRule(
            cel="has(self.maxPerplexity) != has(self.percentile)",
            message="set exactly one of maxPerplexity or percentile",
            check=lambda p: (p.max_perplexity is None) != (p.percentile is None),
            field_path=".percentile",
        ),
    )


class CurationSpec(ApiModel):
    """Data curation before training; the data report (train/data_report.json) says what each step removed."""

    near_duplicates: NearDuplicateSpec | None = None
    """Near-duplicate removal (off when unset)."""
    decontamination: DecontaminationSpec | None = None
    """Removal of training rows that leak dataset.eval (off when unset; needs dataset.eval)."""
    perplexity: PerplexitySpec | None = None
    """Perplexity filter scored by the base model (off when unset)."""
    max_drop_fraction: float | None = Field(default=None, ge=0, le=1)
    """Gate: fail the run (before training) when more than this fraction of all input rows was dropped."""
    max_contamination: float | None = Field(default=None, ge=0, le=1)
    """Gate: fail the run (before training) when more than this fraction of the eval rows leaked into the
    training data."""

    cel_rules = (
        CelRule(
            cel="!has(self.maxContamination) || has(self.decontamination)",
            message="maxContamination requires decontamination",
            check=lambda c: c.max_contamination is None or c.decontamination is not None,
            field_path=".maxContamination",
        ),
    )


class DatasetSpec(ApiModel):
    """Training (and optional evaluation) data: one list of files (train) or a weighted mixture (sources)."""

    train: list[DataUri] | None = Field(default=None, min_length=1, max_length=64)
    """Training files: s3://bucket/key or paths (JSONL or Parquet, chosen by extension); `sftjob run` also
    accepts ./relative paths, resolved against the manifest's directory. Exclusive with sources."""
    sources: list[DataSource] | None = Field(default=None, min_length=1, max_length=16)
    """A mixture of sources, each with its own files, format and weight. Exclusive with train."""
    format: DatasetFormat = "alpaca"
    """alpaca: instruction/input/output; messages: chat turns rendered with the tokenizer's chat template
    (only assistant turns are trained); prompt_completion: prompt/completion pairs."""
    eval: list[DataUri] | None = Field(default=None, max_length=64)
    """Held-out evaluation files (format and fieldMapping above). If unset, evalSplit of the training data is
    held out."""
    eval_split: float = Field(default=0.05, gt=0, lt=0.5)
    """Fraction of training rows held out for evaluation (fixed seed) when eval is unset."""
    field_mapping: FieldMapping = Field(default_factory=FieldMapping)
    """Column names when they differ from the format's defaults."""
    max_seq_length: int = Field(default=2048, ge=16, le=131072)
    """Maximum tokens per sample; longer prompts are truncated from the left so the response stays."""
    packing: bool = True
    """Pack several samples into one sequence (padding-free, no attention across samples)."""
    filter: FilterSpec = Field(default_factory=FilterSpec)
    """Length and duplicate filtering."""
    curation: CurationSpec | None = None
    """Near-duplicate removal, eval decontamination, perplexity filter and data gates."""

    cel_rules = (
        CelRule(
            cel="has(self.train) != has(self.sources)",
            message="set exactly one of train or sources",
            check=lambda d: (d.train is None) != (d.sources is None),
            field_path=".sources",
        ),
        CelRule(
            cel="!has(self.sources) || self.sources.all(s, self.sources.filter(t, t.name == s.name).size() == 1)",
            message="source names must be unique",
            check=lambda d: d.sources is None or len({s.name for s in d.sources}) == len(d.sources),
            field_path=".sources",
        ),
        CelRule(
            cel="!has(self.sources) || self.sources.all(s, has(s.weight))"
            " || self.sources.all(s, !has(s.weight))",
            message="either every source has a weight or none does",
            check=lambda d: (
                d.sources is None
                or all(s.weight is not None for s in d.sources)
                or all(s.weight is None for s in d.sources)
            ),
            field_path=".sources",
        ),
        CelRule(
            cel="!has(self.sources) || !self.sources.all(s, has(s.weight))"
            " || (self.sources.map(s, s.weight).sum() >= 0.999 && self.sources.map(s, s.weight).sum() <= 1.001)",
            message="source weights must sum to 1",
            check=lambda d: (
                d.sources is None
                or any(s.weight is None for s in d.sources)
                or abs(sum(s.weight or 0 for s in d.sources) - 1) <= 0.001
            ),
            field_path=".sources",
        ),
        CelRule(
            cel="!has(self.curation) || !has(self.curation.decontamination) || has(self.eval)",
            message="curation.decontamination needs dataset.eval (the eval set to check against)",
            check=lambda d: d.curation is None or d.curation.decontamination is None or d.eval is not None,
            field_path=".curation.decontamination",
        ),
    )

    def resolved_sources(self) -> list[DataSource]:
        """The training sources with format and fieldMapping filled in; the single-source form (train) is one
        source named "train" contributing all its rows."""
        if self.sources is None:
            return [
                DataSource(
                    name="train",
                    files=list(self.train or []),
                    format=self.format,
                    field_mapping=self.field_mapping,
                )
            ]
        return [
            s.model_copy(
                update={
                    "format": s.format or self.format,
                    "field_mapping": s.field_mapping or self.field_mapping,
                }
            )
            for s in self.sources
        ]

    def input_uris(self) -> list[tuple[str, str]]:
        """(field path under spec.dataset, uri) for every data file this spec reads."""
        out = [(f"train.{i}", u) for i, u in enumerate(self.train or [])]
        for j, s in enumerate(self.sources or []):
            out += [(f"sources.{j}.files.{i}", u) for i, u in enumerate(s.files)]
        return out + [(f"eval.{i}", u) for i, u in enumerate(self.eval or [])]

    def with_uris(self, fn: Callable[[str], str]) -> DatasetSpec:
        """A copy with every data file's uri mapped by fn (pvc:// -> mount path, ./relative -> absolute)."""
        return self.model_copy(
            update={
                "train": self.train and [fn(u) for u in self.train],
                "sources": self.sources
                and [s.model_copy(update={"files": [fn(u) for u in s.files]}) for s in self.sources],
                "eval": self.eval and [fn(u) for u in self.eval],
            }
        )
