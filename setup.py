"""The one native part of memetrain: a batch JPEG decoder (memetrain/data/_jpeg_rows.c).

Everything else is declared in setup.cfg. The extension needs libjpeg-turbo's headers (Debian:
libjpeg62-turbo-dev); without them the install still succeeds, and the stream decodes one image at
a time (``memetrain.data.decode.native_rows()`` is then False).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "memetrain.data._jpeg_rows",
            sources=["memetrain/data/_jpeg_rows.c"],
            libraries=["jpeg"],
            optional=True,  # a failed build is a warning; the stream then says so when it starts
        )
    ]
)
