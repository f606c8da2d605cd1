"""A few MB of English prose for experiments beside the built-in corpus (Python source code), without network.

gensim's wheel ships a shortened English Wikipedia dump in its test data (206 pages, 6 MB of wikitext). This
keeps its 106 articles (redirects and empty pages dropped), strips the markup with gensim's own `filter_wiki` and
writes one JSON line per article, `{"title": ..., "text": ...}`: about 3.1 MB of text, which `data.source` reads
as a local file.

    pip install gensim
    python benchmarks/enwiki_sample.py data/enwiki-sample.jsonl
    ./xlab.py fit --data.source=data/enwiki-sample.jsonl

Prints, as its last line, one JSON object: articles, characters, the output path.
"""

from __future__ import annotations

import argparse
import bz2
import json
import re
from pathlib import Path

DUMP = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def articles() -> list[dict[str, str]]:
    """The dump's articles as plain text: namespace 0, redirects left out, bold/italic quotes removed."""
    try:
        import gensim
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as missing:
        raise SystemExit("enwiki_sample.py reads the Wikipedia sample in gensim's test data: "
                         "pip install gensim") from missing
    dump = Path(gensim.__file__).parent / DUMP
    found = []
    with bz2.open(dump) as xml:
        for title, wikitext, _ in extract_pages(xml, filter_namespaces=("0",)):
            text = re.sub(r"'{2,}", "", filter_wiki(wikitext)).strip()
            if text and not text.upper().startswith("#REDIRECT"):
                found.append({"title": title, "text": text})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path, help="the JSON-lines file to write")
    args = parser.parse_args()
    docs = articles()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs), encoding="utf-8")
    print(json.dumps({"articles": len(docs), "characters": sum(len(d["text"]) for d in docs),
                      "output": str(args.output)}))


if __name__ == "__main__":
    main()
