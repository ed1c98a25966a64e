"""The one native module (``pycompart.transport._gate``), optional: where it
cannot be built, pycompart installs and runs without it (``gate.NATIVE``)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "pycompart.transport._gate", ["src/pycompart/transport/_gate.c"], optional=True,
    extra_compile_args=["-O2", "-Wall", "-Wextra", "-Werror=implicit-function-declaration"])])
