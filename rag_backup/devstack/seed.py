"""Deterministic sample data for the four stores of the RAG question-answering service.

One corpus (:func:`build_corpus`, fixed random seed) feeds every store, so the stores agree with
each other the way production does:

- PostgreSQL ``ragqa`` (owned by ``ragqa_user``): ``documents``, ``conversations``, ``feedback``.
- Milvus ``ministry_text`` (one 384-d vector per document, ``id`` = ``documents.id``, one
  partition per language) and ``ministry_images`` (512-d, ids of the documents with an image).
- S3 ``documents`` (``raw/``, ``processed/``, ``images/``, ``thumbnails/``) holding exactly the
  objects that ``documents.object_key`` / ``image_key`` name, written ``<bucket>/<key>``; and
  ``models`` (``base/``, ``finetuned/``, ``training_data/``, ``eval_data/``), including a
  multipart upload of a few MB.
- Redis: answer cache (TTL 1 h) and sessions (TTL 30 min) in db 0, embedding cache in db 1, and
  keys without TTL in both.

Each ``seed_<store>`` function takes that store's connection settings (and optionally a corpus)
and replaces its own sample objects, so it can be called again to reset a store.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import random
import struct
import uuid
import zlib
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from rag_backup.devstack.settings import (
    RAGQA_DB,
    RAGQA_USER,
    MilvusSettings,
    PostgresSettings,
    RedisSettings,
    S3Settings,
)

SEED = 20240101
BASE_TIME = datetime(2023, 1, 1, tzinfo=UTC)
TEXT_COLLECTION = "ministry_text"
IMAGE_COLLECTION = "ministry_images"
TEXT_DIM = 384
IMAGE_DIM = 512
TEXT_MAX_CHARS = 1000  # Hindi is 3 bytes a character in UTF-8: fits max_length below
TEXT_MAX_LENGTH = 4096
LANGUAGES = ("hi", "en", "hi-en")
MILVUS_TIMEOUT_S = 120.0

MINISTRIES = (
    (
        "कृषि एवं किसान कल्याण मंत्रालय",
        "Ministry of Agriculture and Farmers Welfare",
        "agriwelfare.gov.in",
    ),
    (
        "स्वास्थ्य एवं परिवार कल्याण मंत्रालय",
        "Ministry of Health and Family Welfare",
        "mohfw.gov.in",
    ),
    ("शिक्षा मंत्रालय", "Ministry of Education", "education.gov.in"),
    ("ग्रामीण विकास मंत्रालय", "Ministry of Rural Development", "rural.gov.in"),
    ("वित्त मंत्रालय", "Ministry of Finance", "finmin.gov.in"),
    ("रेल मंत्रालय", "Ministry of Railways", "indianrailways.gov.in"),
    ("जल शक्ति मंत्रालय", "Ministry of Jal Shakti", "jalshakti.gov.in"),
    (
        "महिला एवं बाल विकास मंत्रालय",
        "Ministry of Women and Child Development",
        "wcd.gov.in",
    ),
)
TOPICS = (
    ("प्रधानमंत्री किसान सम्मान निधि", "PM-KISAN income support"),
    ("फसल बीमा योजना", "crop insurance scheme"),
    ("आयुष्मान भारत स्वास्थ्य बीमा", "Ayushman Bharat health cover"),
    ("छात्रवृत्ति योजना", "scholarship scheme"),
    ("मनरेगा मजदूरी भुगतान", "MGNREGA wage payments"),
    ("प्रधानमंत्री आवास योजना", "PM housing scheme"),
    ("जल जीवन मिशन", "Jal Jeevan Mission"),
    ("वृद्धावस्था पेंशन", "old-age pension"),
    ("टीकाकरण अभियान", "vaccination drive"),
    ("रेल टिकट रिफंड नियम", "railway ticket refund rules"),
    ("पोषण अभियान", "nutrition mission"),
    ("मृदा स्वास्थ्य कार्ड", "soil health card"),
)
DOC_TYPES = (
    ("परिपत्र", "circular", "circulars"),
    ("दिशानिर्देश", "guidelines", "guidelines"),
    ("अधिसूचना", "notification", "notifications"),
    ("प्रश्नोत्तर", "FAQ", "faq"),
    ("प्रेस विज्ञप्ति", "press release", "press"),
)
HI_SENTENCES = (
    "{ministry_hi} द्वारा {topic_hi} के संबंध में यह {type_hi} जारी किया गया है।",
    "पात्र लाभार्थी 31 मार्च {year} तक आवेदन कर सकते हैं।",
    "आवेदन ऑनलाइन पोर्टल या निकटतम जन सेवा केंद्र पर किया जा सकता है।",
    "सहायता राशि सीधे लाभार्थी के बैंक खाते में भेजी जाएगी।",
    "आधार संख्या और बैंक विवरण का सत्यापन अनिवार्य है।",
    "अधिक जानकारी के लिए जिला कार्यालय से संपर्क करें।",
    "शिकायत दर्ज करने के लिए हेल्पलाइन नंबर 1800-180-{ref4} पर कॉल करें।",
    "यह आदेश तत्काल प्रभाव से लागू होगा।",
)
EN_SENTENCES = (
    "This {type_en} on {topic_en} is issued by the {ministry_en}.",
    "Eligible beneficiaries may apply until 31 March {year}.",
    "Applications can be submitted on the online portal or at the nearest common service centre.",
    "The assistance is transferred directly to the beneficiary's bank account.",
    "Verification of Aadhaar number and bank details is mandatory.",
    "For details, contact the district office.",
    "To register a grievance, call the helpline 1800-180-{ref4}.",
    "This order comes into force with immediate effect.",
    "Reference number {ref}.",
)
QUESTIONS = (
    ("{topic_hi} के लिए आवेदन कैसे करें?", "hi"),
    ("{topic_hi} की अंतिम तिथि क्या है?", "hi"),
    ("{topic_hi} में कितनी राशि मिलती है?", "hi"),
    ("How do I apply for the {topic_en}?", "en"),
    ("What documents are needed for the {topic_en}?", "en"),
    ("Who is eligible for the {topic_en}?", "en"),
    ("{topic_en} ki last date kya hai?", "hi-en"),
    ("{topic_hi} ke liye eligibility kya hai? (eligibility for {topic_en})", "hi-en"),
)
COMMENTS = (
    "बहुत उपयोगी जानकारी, धन्यवाद।",
    "उत्तर अधूरा था।",
    "Helpful and accurate.",
    "The answer cited an outdated circular.",
    "Please add the helpline number.",
    "सही दस्तावेज़ मिला।",
)


# -- the corpus ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Document:
    id: int
    title: str
    body: str
    language: str
    source_uri: str
    object_key: str  # "<bucket>/<key>", e.g. documents/raw/100001.html
    image_key: str | None  # "<bucket>/<key>" of the document's image, or None
    metadata: dict[str, object]
    created_at: datetime

    @property
    def milvus_text(self) -> str:
        return f"{self.title}\n{self.body}"[:TEXT_MAX_CHARS]


@dataclass(frozen=True)
class Conversation:
    id: uuid.UUID
    session_id: uuid.UUID
    question: str
    answer: str
    language: str
    document_ids: tuple[int, ...]
    created_at: datetime


@dataclass(frozen=True)
class Feedback:
    conversation_id: uuid.UUID
    rating: int
    comment: str | None
    created_at: datetime


@dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]
    conversations: tuple[Conversation, ...]
    feedback: tuple[Feedback, ...]
    seed: int = SEED

    @property
    def documents_with_images(self) -> tuple[Document, ...]:
        return tuple(d for d in self.documents if d.image_key)


def split_key(bucket_and_key: str) -> tuple[str, str]:
    """``"documents/raw/1.html"`` -> ``("documents", "raw/1.html")``."""
    bucket, _, key = bucket_and_key.partition("/")
    return bucket, key


def _uuid(rng: random.Random) -> uuid.UUID:
    return uuid.UUID(int=rng.getrandbits(128), version=4)


@lru_cache(maxsize=4)
def build_corpus(
    seed: int = SEED,
    n_documents: int = 2000,
    n_conversations: int = 3000,
    n_feedback: int = 1000,
) -> Corpus:
    """The sample data, identical on every call with the same arguments."""
    rng = random.Random(seed)
    documents = tuple(_document(rng, i) for i in range(n_documents))
    sessions = [_uuid(rng) for _ in range(max(1, n_conversations // 4))]
    conversations = tuple(
        _conversation(rng, documents, sessions) for _ in range(n_conversations)
    )
    feedback = tuple(_feedback(rng, conversations) for _ in range(n_feedback))
    return Corpus(
        documents=documents, conversations=conversations, feedback=feedback, seed=seed
    )


def _document(rng: random.Random, index: int) -> Document:
    doc_id = 100_000 + index * 3 + rng.randint(1, 3)  # increasing, with gaps
    ministry_hi, ministry_en, domain = rng.choice(MINISTRIES)
    topic_hi, topic_en = rng.choice(TOPICS)
    type_hi, type_en, type_slug = rng.choice(DOC_TYPES)
    year = rng.randint(2019, 2024)
    language = rng.choices(LANGUAGES, weights=(45, 35, 20))[0]
    ref = f"{domain.split('.')[0].upper()}/{year}/{rng.randint(1, 9999):04d}"
    values = {
        "ministry_hi": ministry_hi,
        "ministry_en": ministry_en,
        "topic_hi": topic_hi,
        "topic_en": topic_en,
        "type_hi": type_hi,
        "type_en": type_en,
        "year": year,
        "ref": ref,
        "ref4": f"{rng.randint(0, 9999):04d}",
    }
    hi_title = f"{topic_hi} {type_hi} {year}"
    en_title = f"{topic_en[0].upper()}{topic_en[1:]} {type_en} {year}"
    title = {"hi": hi_title, "en": en_title, "hi-en": f"{hi_title} — {en_title}"}[
        language
    ]
    title = f"{title} (#{doc_id})"
    n_sentences = rng.randint(4, 8)
    sentences: list[str] = []
    if language in ("hi", "hi-en"):
        sentences += [
            s.format(**values)
            for s in [HI_SENTENCES[0], *rng.sample(HI_SENTENCES[1:], n_sentences - 1)]
        ]
    if language in ("en", "hi-en"):
        sentences += [
            s.format(**values)
            for s in [EN_SENTENCES[0], *rng.sample(EN_SENTENCES[1:], n_sentences - 1)]
        ]
    body = " ".join(sentences)
    raw = rng.random() < 0.6
    object_key = (
        f"documents/raw/{doc_id}.html" if raw else f"documents/processed/{doc_id}.txt"
    )
    image_key = f"documents/images/{doc_id}.png" if rng.random() < 0.3 else None
    metadata: dict[str, object] = {
        "ministry": ministry_en,
        "ministry_hi": ministry_hi,
        "doc_type": type_en,
        "year": year,
        "reference": ref,
        "pages": rng.randint(1, 40),
        "tags": sorted(
            rng.sample(
                [
                    "scheme",
                    "eligibility",
                    "deadline",
                    "payment",
                    "grievance",
                    "health",
                    "rural",
                ],
                2,
            )
        ),
    }
    created_at = BASE_TIME + timedelta(seconds=rng.randint(0, 2 * 365 * 86400))
    return Document(
        id=doc_id,
        title=title,
        body=body,
        language=language,
        source_uri=f"https://{domain}/{type_slug}/{year}/{doc_id}",
        object_key=object_key,
        image_key=image_key,
        metadata=metadata,
        created_at=created_at,
    )


def _conversation(
    rng: random.Random, documents: tuple[Document, ...], sessions: list[uuid.UUID]
) -> Conversation:
    topic_hi, topic_en = rng.choice(TOPICS)
    template, language = rng.choice(QUESTIONS)
    cited = tuple(sorted({d.id for d in rng.sample(documents, rng.randint(1, 4))}))
    if language == "en":
        answer = f"According to the cited documents, the {topic_en} is administered by the district office. Sources: {', '.join(map(str, cited))}."
    else:
        answer = f"उद्धृत दस्तावेज़ों के अनुसार {topic_hi} का संचालन जिला कार्यालय द्वारा किया जाता है। स्रोत: {', '.join(map(str, cited))}।"
    return Conversation(
        id=_uuid(rng),
        session_id=rng.choice(sessions),
        question=template.format(topic_hi=topic_hi, topic_en=topic_en),
        answer=answer,
        language=language,
        document_ids=cited,
        created_at=BASE_TIME + timedelta(days=365, seconds=rng.randint(0, 365 * 86400)),
    )


def _feedback(rng: random.Random, conversations: tuple[Conversation, ...]) -> Feedback:
    conversation = rng.choice(conversations)
    return Feedback(
        conversation_id=conversation.id,
        rating=rng.randint(1, 5),
        comment=rng.choice(COMMENTS) if rng.random() < 0.6 else None,
        created_at=conversation.created_at + timedelta(minutes=rng.randint(1, 600)),
    )


# -- PostgreSQL ------------------------------------------------------------------------------------
POSTGRES_SCHEMA = """
DROP TABLE IF EXISTS feedback, conversations, documents;
CREATE TABLE documents (
    id          bigint PRIMARY KEY,
    title       text NOT NULL,
    body        text NOT NULL,
    language    text NOT NULL CHECK (language IN ('hi', 'en', 'hi-en')),
    source_uri  text NOT NULL,
    object_key  text NOT NULL UNIQUE,
    image_key   text,
    metadata    jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at  timestamptz NOT NULL
);
CREATE INDEX documents_language_idx ON documents (language);
CREATE TABLE conversations (
    id            uuid PRIMARY KEY,
    session_id    uuid NOT NULL,
    question      text NOT NULL,
    answer        text NOT NULL,
    document_ids  bigint[] NOT NULL,
    created_at    timestamptz NOT NULL
);
CREATE INDEX conversations_session_idx ON conversations (session_id, created_at);
CREATE TABLE feedback (
    id               serial PRIMARY KEY,
    conversation_id  uuid NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    rating           integer NOT NULL CHECK (rating BETWEEN 1 AND 5),
    comment          text,
    created_at       timestamptz NOT NULL
);
"""


@dataclass(frozen=True)
class SeedReport:
    store: str
    counts: dict[str, int] = field(default_factory=dict)


def _csv(rows: list[tuple[object, ...]]) -> io.StringIO:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    for row in rows:
        writer.writerow(["\\N" if v is None else v for v in row])
    buffer.seek(0)
    return buffer


def _copy(
    cur, table: str, columns: tuple[str, ...], rows: list[tuple[object, ...]]
) -> None:
    cur.copy_expert(
        f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv, NULL '\\N')",
        _csv(rows),
    )


def seed_postgres(
    settings: PostgresSettings, corpus: Corpus | None = None
) -> SeedReport:
    """Create (or re-create) the ``ragqa`` tables as ``ragqa_user`` and load the corpus with COPY.

    ``settings`` is a superuser (``RAG_PG_*``); the database ``ragqa`` and the role must exist
    (the devstack creates both).
    """
    import psycopg2

    corpus = corpus or build_corpus()
    with contextlib.closing(
        psycopg2.connect(**settings.connect_kwargs(RAGQA_DB))
    ) as conn:
        with conn, conn.cursor() as cur:
            cur.execute(
                f"SET ROLE {RAGQA_USER}"
            )  # the tables belong to the application's role
            cur.execute(POSTGRES_SCHEMA)
            _copy(
                cur,
                "documents",
                (
                    "id",
                    "title",
                    "body",
                    "language",
                    "source_uri",
                    "object_key",
                    "image_key",
                    "metadata",
                    "created_at",
                ),
                [
                    (
                        d.id,
                        d.title,
                        d.body,
                        d.language,
                        d.source_uri,
                        d.object_key,
                        d.image_key,
                        json.dumps(d.metadata, ensure_ascii=False, sort_keys=True),
                        d.created_at.isoformat(),
                    )
                    for d in corpus.documents
                ],
            )
            _copy(
                cur,
                "conversations",
                (
                    "id",
                    "session_id",
                    "question",
                    "answer",
                    "document_ids",
                    "created_at",
                ),
                [
                    (
                        str(c.id),
                        str(c.session_id),
                        c.question,
                        c.answer,
                        "{" + ",".join(map(str, c.document_ids)) + "}",
                        c.created_at.isoformat(),
                    )
                    for c in corpus.conversations
                ],
            )
            _copy(
                cur,
                "feedback",
                ("conversation_id", "rating", "comment", "created_at"),
                [
                    (
                        str(f.conversation_id),
                        f.rating,
                        f.comment,
                        f.created_at.isoformat(),
                    )
                    for f in corpus.feedback
                ],
            )
            cur.execute("RESET ROLE")
        with conn, conn.cursor() as cur:
            cur.execute("ANALYZE documents; ANALYZE conversations; ANALYZE feedback")
    return SeedReport(
        "postgres",
        {
            "documents": len(corpus.documents),
            "conversations": len(corpus.conversations),
            "feedback": len(corpus.feedback),
        },
    )


# -- Milvus ----------------------------------------------------------------------------------------
def _unit_vectors(seed: int, count: int, dim: int) -> list[list[float]]:
    import numpy as np

    vectors = np.random.default_rng(seed).standard_normal(
        (count, dim), dtype=np.float32
    )
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors.tolist()


def text_partition(language: str) -> str:
    return "lang_" + language.replace("-", "_")


def seed_milvus(
    settings: MilvusSettings, corpus: Corpus | None = None, batch_size: int = 500
) -> SeedReport:
    """Create ``ministry_text`` and ``ministry_images`` (dropping old ones), insert, flush, index, load."""
    from pymilvus import DataType, MilvusClient

    corpus = corpus or build_corpus()
    client = MilvusClient(
        uri=settings.uri, token=settings.token, timeout=MILVUS_TIMEOUT_S
    )
    try:
        # ministry_text: one vector per document, a partition per language, HNSW index.
        schema = MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description="RAG text chunks"
        )
        schema.add_field(
            "id", DataType.INT64, is_primary=True, description="documents.id"
        )
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=TEXT_DIM)
        schema.add_field("text", DataType.VARCHAR, max_length=TEXT_MAX_LENGTH)
        schema.add_field("language", DataType.VARCHAR, max_length=16)
        _recreate(client, TEXT_COLLECTION, schema)
        for language in LANGUAGES:
            client.create_partition(
                TEXT_COLLECTION, text_partition(language), timeout=MILVUS_TIMEOUT_S
            )
        vectors = _unit_vectors(corpus.seed, len(corpus.documents), TEXT_DIM)
        rows_by_partition: dict[str, list[dict[str, object]]] = {}
        for doc, vector in zip(corpus.documents, vectors, strict=True):
            rows_by_partition.setdefault(text_partition(doc.language), []).append(
                {
                    "id": doc.id,
                    "embedding": vector,
                    "text": doc.milvus_text,
                    "language": doc.language,
                }
            )
        for partition, rows in rows_by_partition.items():
            for start in range(0, len(rows), batch_size):
                client.insert(
                    TEXT_COLLECTION,
                    rows[start : start + batch_size],
                    partition_name=partition,
                    timeout=MILVUS_TIMEOUT_S,
                )
        text_index = client.prepare_index_params()
        text_index.add_index(
            field_name="embedding",
            index_type="HNSW",
            metric_type="COSINE",
            params={"M": 16, "efConstruction": 64},
        )

        # ministry_images: one vector per document image, IVF_FLAT index.
        schema = MilvusClient.create_schema(
            auto_id=False, enable_dynamic_field=False, description="RAG document images"
        )
        schema.add_field(
            "id", DataType.INT64, is_primary=True, description="documents.id"
        )
        schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=IMAGE_DIM)
        schema.add_field("image_key", DataType.VARCHAR, max_length=512)
        _recreate(client, IMAGE_COLLECTION, schema)
        images = corpus.documents_with_images
        image_vectors = _unit_vectors(corpus.seed + 1, len(images), IMAGE_DIM)
        image_rows = [
            {"id": d.id, "embedding": v, "image_key": d.image_key}
            for d, v in zip(images, image_vectors, strict=True)
        ]
        for start in range(0, len(image_rows), batch_size):
            client.insert(
                IMAGE_COLLECTION,
                image_rows[start : start + batch_size],
                timeout=MILVUS_TIMEOUT_S,
            )
        image_index = client.prepare_index_params()
        image_index.add_index(
            field_name="embedding",
            index_type="IVF_FLAT",
            metric_type="COSINE",
            params={"nlist": 64},
        )

        def finish(name: str, index: object) -> None:
            client.flush(name, timeout=MILVUS_TIMEOUT_S)
            client.create_index(name, index, timeout=MILVUS_TIMEOUT_S)
            client.load_collection(name, timeout=MILVUS_TIMEOUT_S)

        # Flushing and loading mostly wait on the server's own timers: do both collections at once.
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = [
                pool.submit(finish, TEXT_COLLECTION, text_index),
                pool.submit(finish, IMAGE_COLLECTION, image_index),
            ]
            for future in futures:
                future.result()
    finally:
        with contextlib.suppress(Exception):
            client.close()
    return SeedReport(
        "milvus",
        {TEXT_COLLECTION: len(corpus.documents), IMAGE_COLLECTION: len(images)},
    )


def _recreate(client, name: str, schema) -> None:
    if client.has_collection(name, timeout=MILVUS_TIMEOUT_S):
        client.drop_collection(name, timeout=MILVUS_TIMEOUT_S)
    client.create_collection(
        name, schema=schema, consistency_level="Strong", timeout=MILVUS_TIMEOUT_S
    )


# -- S3 --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class S3Object:
    bucket: str
    key: str
    body: bytes
    content_type: str
    metadata: dict[str, str] = field(default_factory=dict)


def png(width: int, height: int, rng: random.Random) -> bytes:
    """A valid (noisy) RGB PNG, deterministic for a given ``rng`` state."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _html(doc: Document) -> bytes:
    lang = "hi" if doc.language != "en" else "en"
    return (
        f'<!DOCTYPE html>\n<html lang="{lang}"><head><meta charset="utf-8"><title>{doc.title}</title></head>\n'
        f'<body><h1>{doc.title}</h1>\n<p>{doc.body}</p>\n<p><a href="{doc.source_uri}">{doc.source_uri}</a></p></body></html>\n'
    ).encode()


def document_objects(corpus: Corpus) -> list[S3Object]:
    """Every object of the ``documents`` bucket: one per ``object_key``, one per ``image_key``, thumbnails."""
    rng = random.Random(corpus.seed + 2)
    objects: list[S3Object] = []
    for doc in corpus.documents:
        bucket, key = split_key(doc.object_key)
        if key.startswith("raw/"):
            metadata = (
                {
                    "document-id": str(doc.id),
                    "language": doc.language,
                    "source": "crawler",
                }
                if doc.id % 5 == 0
                else {}
            )
            objects.append(
                S3Object(bucket, key, _html(doc), "text/html; charset=utf-8", metadata)
            )
        else:
            objects.append(
                S3Object(
                    bucket,
                    key,
                    f"{doc.title}\n\n{doc.body}\n".encode(),
                    "text/plain; charset=utf-8",
                )
            )
        if doc.image_key:
            bucket, key = split_key(doc.image_key)
            objects.append(
                S3Object(
                    bucket,
                    key,
                    png(48, 32, rng),
                    "image/png",
                    {"document-id": str(doc.id)},
                )
            )
            if doc.id % 2 == 0:
                objects.append(
                    S3Object(
                        bucket, f"thumbnails/{doc.id}.png", png(12, 8, rng), "image/png"
                    )
                )
    return objects


def model_objects(corpus: Corpus) -> list[S3Object]:
    """The ``models`` bucket: base and fine-tuned weights (a few MB of noise), training and eval data."""
    rng = random.Random(corpus.seed + 3)
    qa = [
        json.dumps(
            {
                "question": c.question,
                "answer": c.answer,
                "document_ids": list(c.document_ids),
            },
            ensure_ascii=False,
        )
        for c in corpus.conversations
    ]
    split = len(qa) * 4 // 5
    base = "base/multilingual-e5-small"
    tuned = "finetuned/ministry-qa-v1"
    config = {
        "model_type": "bert",
        "hidden_size": TEXT_DIM,
        "num_hidden_layers": 12,
        "vocab_size": 250037,
    }
    return [
        S3Object(
            "models",
            f"{base}/config.json",
            json.dumps(config).encode(),
            "application/json",
        ),
        S3Object(
            "models",
            f"{base}/tokenizer.json",
            rng.randbytes(200_000),
            "application/json",
        ),
        S3Object(
            "models",
            f"{base}/model.safetensors",
            rng.randbytes(7 * 1024 * 1024),
            "application/octet-stream",
            {"framework": "pytorch", "dim": str(TEXT_DIM)},
        ),
        S3Object(
            "models",
            f"{tuned}/adapter_model.safetensors",
            rng.randbytes(3 * 1024 * 1024),
            "application/octet-stream",
            {"base-model": "multilingual-e5-small", "epochs": "3"},
        ),
        S3Object(
            "models",
            f"{tuned}/training_args.json",
            json.dumps({"epochs": 3, "lr": 2e-5, "seed": corpus.seed}).encode(),
            "application/json",
        ),
        S3Object(
            "models",
            "training_data/ministry_qa_train.jsonl",
            ("\n".join(qa[:split]) + "\n").encode(),
            "application/x-ndjson",
        ),
        S3Object(
            "models",
            "eval_data/ministry_qa_eval.jsonl",
            ("\n".join(qa[split:]) + "\n").encode(),
            "application/x-ndjson",
        ),
    ]


MULTIPART_THRESHOLD = (
    5 * 1024 * 1024
)  # objects above this go up in 5 MiB parts (a multipart ETag)


def seed_s3(
    settings: S3Settings, corpus: Corpus | None = None, workers: int = 8
) -> SeedReport:
    """Create the ``documents`` and ``models`` buckets (if missing) and upload their objects."""
    from boto3.s3.transfer import TransferConfig

    corpus = corpus or build_corpus()
    client = settings.client()
    objects = document_objects(corpus) + model_objects(corpus)
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    for bucket in sorted({o.bucket for o in objects} - existing):
        client.create_bucket(Bucket=bucket)
    transfer = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_THRESHOLD,
        use_threads=False,
    )

    def upload(obj: S3Object) -> None:
        extra: dict[str, object] = {"ContentType": obj.content_type}
        if obj.metadata:
            extra["Metadata"] = obj.metadata
        if len(obj.body) > MULTIPART_THRESHOLD:
            client.upload_fileobj(
                io.BytesIO(obj.body),
                obj.bucket,
                obj.key,
                ExtraArgs=extra,
                Config=transfer,
            )
        else:
            client.put_object(Bucket=obj.bucket, Key=obj.key, Body=obj.body, **extra)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(upload, objects))
    counts: dict[str, int] = {}
    for obj in objects:
        counts[obj.bucket] = counts.get(obj.bucket, 0) + 1
    return SeedReport("s3", counts)


# -- Redis -----------------------------------------------------------------------------------------
ANSWER_TTL_S = 3600
SESSION_TTL_S = 1800
EMBEDDING_TTL_S = 86400


def seed_redis(settings: RedisSettings, corpus: Corpus | None = None) -> SeedReport:
    """Answer cache and sessions with TTLs, plus keys without TTL, in db 0 and db 1; then SAVE."""
    import numpy as np
    import redis

    corpus = corpus or build_corpus()
    rng = random.Random(corpus.seed + 4)
    counts: dict[str, int] = {}

    def client(db: int) -> redis.Redis:
        return redis.Redis(
            host=settings.host,
            port=settings.port,
            password=settings.password,
            db=db,
            socket_timeout=30,
        )

    db0 = client(0)
    pipe = db0.pipeline(transaction=False)
    answered = corpus.conversations[:300]
    for conv in answered:
        key = (
            "cache:answer:"
            + hashlib.sha256(conv.question.encode() + conv.id.bytes).hexdigest()[:24]
        )
        value = json.dumps(
            {"answer": conv.answer, "document_ids": list(conv.document_ids)},
            ensure_ascii=False,
        )
        pipe.set(key, value, ex=ANSWER_TTL_S)
    sessions = sorted({c.session_id for c in corpus.conversations[:400]})[:100]
    for session_id in sessions:
        key = f"session:{session_id}"
        pipe.delete(key)
        pipe.hset(
            key,
            mapping={
                "language": rng.choice(LANGUAGES),
                "turns": rng.randint(1, 12),
                "last_question": rng.choice(corpus.conversations).question,
                "started_at": (
                    BASE_TIME + timedelta(days=700, seconds=rng.randint(0, 86400))
                ).isoformat(),
            },
        )
        pipe.expire(key, SESSION_TTL_S)
    pipe.set("config:model_version", "ministry-qa-v1")
    pipe.delete("stats:queries", "recent:questions", "popular:documents", "languages")
    pipe.hset(
        "stats:queries",
        mapping={
            lang: sum(1 for c in corpus.conversations if c.language == lang)
            for lang in LANGUAGES
        },
    )
    pipe.rpush("recent:questions", *[c.question for c in corpus.conversations[-50:]])
    popular: dict[str, float] = {}
    for conv in corpus.conversations:
        for doc_id in conv.document_ids:
            popular[str(doc_id)] = popular.get(str(doc_id), 0.0) + 1.0
    pipe.zadd(
        "popular:documents",
        dict(sorted(popular.items(), key=lambda kv: (-kv[1], kv[0]))[:200]),
    )
    pipe.sadd("languages", *LANGUAGES)
    pipe.execute()
    counts["db0"] = int(db0.dbsize())

    db1 = client(1)
    pipe = db1.pipeline(transaction=False)
    vectors = np.random.default_rng(corpus.seed + 5).standard_normal(
        (200, TEXT_DIM), dtype=np.float32
    )
    for doc, vector in zip(corpus.documents[:200], vectors, strict=True):
        pipe.set(
            f"embedding:doc:{doc.id}", vector.tobytes(), ex=EMBEDDING_TTL_S
        )  # binary values
    pipe.delete("feature:flags")
    pipe.hset(
        "feature:flags",
        mapping={"hybrid_search": "on", "image_answers": "off", "hindi_reranker": "on"},
    )
    pipe.set("ratelimit:default", 60)
    pipe.execute()
    counts["db1"] = int(db1.dbsize())
    db0.save()  # make the seed durable even if the server is later killed
    db0.close()
    db1.close()
    return SeedReport("redis", counts)


# -- all stores ------------------------------------------------------------------------------------
SEEDERS: dict[str, Callable[[Mapping[str, str], Corpus], SeedReport]] = {
    "postgres": lambda env, corpus: seed_postgres(
        PostgresSettings.from_env(env), corpus
    ),
    "redis": lambda env, corpus: seed_redis(RedisSettings.from_env(env), corpus),
    "s3": lambda env, corpus: seed_s3(S3Settings.from_env(env), corpus),
    "milvus": lambda env, corpus: seed_milvus(MilvusSettings.from_env(env), corpus),
}
