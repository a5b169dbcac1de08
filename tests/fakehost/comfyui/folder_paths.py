# Fake of folder_paths.py (ComfyUI 0.30.0): the model folders by kind; get_filename_list lists a kind's files
# (relative names, sorted), get_full_path_or_raise resolves one. The harness points the folders at a test's tmp dir.
import os

supported_pt_extensions = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}
folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {
    "loras": ([], supported_pt_extensions),
    "vae_approx": ([], supported_pt_extensions),
}


def get_folder_paths(folder_name):
    return folder_names_and_paths[folder_name][0][:]


def get_filename_list(folder_name):
    folders, extensions = folder_names_and_paths[folder_name]
    found = set()
    for folder in folders:
        for root, _dirs, files in os.walk(folder):
            for name in files:
                if os.path.splitext(name)[1].lower() in extensions:
                    found.add(os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/"))
    return sorted(found)


def get_full_path(folder_name, filename):
    for folder in folder_names_and_paths[folder_name][0]:
        path = os.path.join(folder, os.path.normpath("/" + filename).lstrip(os.sep))
        if os.path.isfile(path):
            return path
    return None


def get_full_path_or_raise(folder_name, filename):
    path = get_full_path(folder_name, filename)
    if path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return path
