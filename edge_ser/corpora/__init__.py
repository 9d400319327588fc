"""Emotional speech corpora: layout detection, scanning, reports and cached feature extraction."""
from .base import Corpus, Layout, Problem, Utterance
from .detect import LAYOUTS, CorpusError, open_corpus
from .extract import load_features

__all__ = ["Corpus", "Layout", "Problem", "Utterance", "LAYOUTS", "CorpusError", "open_corpus", "load_features"]
