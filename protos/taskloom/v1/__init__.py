"""taskloom's wire protocol, version 1: generated from the ``.proto`` files beside this one."""
