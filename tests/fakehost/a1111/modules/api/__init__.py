# Fake of modules/api of AUTOMATIC1111 v1.10.1 (82a973c0).
