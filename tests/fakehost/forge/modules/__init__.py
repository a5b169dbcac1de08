# Fake of the Forge front end `modules` package (stable-diffusion-webui-forge dfdcbab6, A1111 1.10.1 front end).
