// The generic build of the fast-scan module (flags and macros: setup.py).
#include "module.cpp"
