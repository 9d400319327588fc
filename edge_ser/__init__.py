"""edge-ser: speech emotion recognition on edge devices, trained from distilled packs.

The server distils a private emotional-speech corpus into a tiny signed *pack* (a few synthetic log-Mel
samples per emotion plus one fixed initialisation); devices receive it over MQTT, train the compact model
locally and run it on the microphone. The public API mirrors the CLI::

    import edge_ser
    info = edge_ser.pack("demo", "demo.pack", ipc=10)             # server
    result = edge_ser.train_local("demo.pack", "model/")          # device
    print(edge_ser.evaluate("model/", "demo")["uar"])
    for r in edge_ser.listen("model/", file="speech.wav"):       # live (or a file)
        print(r.emotion, r.probabilities)

Heavy dependencies load lazily: importing edge_ser is cheap.
"""
__version__ = "0.1.0"

_LAZY = {
    "pack": ("edge_ser.packer", "pack"),
    "load_pack": ("edge_ser.packfile", "load_pack"),
    "inspect_pack": ("edge_ser.inspection", "inspect_pack"),
    "train_local": ("edge_ser.local", "train_local"),
    "evaluate": ("edge_ser.evaluate", "evaluate"),
    "listen": ("edge_ser.stream", "listen"),
    "corpus_info": ("edge_ser.corpora.report", "corpus_info"),
    "load_features": ("edge_ser.corpora.extract", "load_features"),
    "publish": ("edge_ser.chunks", "publish"),
    "keygen": ("edge_ser.signing", "keygen"),
    "FeatureConfig": ("edge_ser.config", "FeatureConfig"),
    "ModelConfig": ("edge_ser.config", "ModelConfig"),
    "TrainConfig": ("edge_ser.config", "TrainConfig"),
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'edge_ser' has no attribute {name!r}")
