# Fake Forge Neo: a module of this package that is not in this folder is the fake Forge's (Neo 2.26 has it as Forge
# has, where DynFuse depends on it).
from neo_overlay import extend

extend(__path__, "backend")
