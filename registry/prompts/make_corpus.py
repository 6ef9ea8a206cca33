#!/usr/bin/env python3
"""Generate ``corpus.txt``: a synthetic corpus of varied image captions and prompts.

The corpus stands in for the ~100K LAION captions the Perfusion authors used to estimate
the uncentered covariance C = E[e e^T] of a text encoder's output encodings (PERFUSION.md §3),
for base models that ship without a precomputed covariance.

Deterministic: fixed seed, Python standard library only. Run

    python registry/prompts/make_corpus.py            # writes corpus.txt next to this script
    python registry/prompts/make_corpus.py -o out.txt

Every word list below was written for this project. The corpus mixes several styles:
short captions, LAION-like alt texts, long comma-separated "prompt engineering" prompts,
product-listing alt texts, stock-photo titles with numbers, and prompts from the tiny
toy world used by the project's test models (about 15%).
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

SEED = 20240501
N_PROMPTS = 4000
MAX_CHARS = 300
MAX_WORDS = 60

# How many prompts of each style (sums to N_PROMPTS).
QUOTAS = {
    "short": 850,
    "medium": 1100,
    "long": 700,
    "product": 400,
    "numbered": 350,
    "toy": 600,  # 15%
}

# ---------------------------------------------------------------------------------------
# Subjects, grouped by kind. The kind decides which actions and places fit.
# ---------------------------------------------------------------------------------------
SUBJECTS = {
    "person": [
        "woman", "man", "girl", "boy", "child", "toddler", "baby", "teenager", "old man",
        "old woman", "young woman", "young man", "businessman", "businesswoman", "chef",
        "doctor", "nurse", "farmer", "fisherman", "firefighter", "police officer", "soldier",
        "astronaut", "knight", "samurai", "wizard", "witch", "pirate", "cowboy", "dancer",
        "ballerina", "musician", "guitarist", "drummer", "painter", "photographer", "student",
        "teacher", "scientist", "surfer", "skateboarder", "cyclist", "runner", "hiker",
        "climber", "bride", "groom", "couple", "family", "group of friends", "monk",
        "princess", "king", "queen", "robot", "cyborg", "mechanic", "barista", "gardener",
    ],
    "animal": [
        "cat", "kitten", "dog", "puppy", "golden retriever", "corgi", "husky", "horse",
        "pony", "cow", "sheep", "goat", "pig", "chicken", "duck", "goose", "swan", "owl",
        "eagle", "parrot", "hummingbird", "penguin", "flamingo", "fox", "wolf", "bear",
        "polar bear", "panda", "koala", "kangaroo", "lion", "tiger", "leopard", "cheetah",
        "elephant", "giraffe", "zebra", "rhino", "hippo", "monkey", "gorilla", "deer",
        "rabbit", "squirrel", "hedgehog", "raccoon", "otter", "seal", "dolphin", "whale",
        "shark", "turtle", "frog", "lizard", "snake", "butterfly", "bee", "dragonfly",
        "jellyfish", "octopus", "crab", "goldfish", "dragon", "unicorn", "phoenix",
    ],
    "object": [
        "chair", "armchair", "sofa", "table", "lamp", "clock", "vase", "teapot", "mug",
        "cup", "bottle", "wine glass", "book", "stack of books", "notebook", "pen", "pencil",
        "backpack", "handbag", "suitcase", "umbrella", "hat", "scarf", "pair of shoes",
        "sneaker", "watch", "necklace", "ring", "pair of sunglasses", "camera", "laptop",
        "smartphone", "keyboard", "headphones", "guitar", "piano", "violin", "trumpet",
        "drum", "teddy bear", "doll", "toy robot", "kite", "balloon", "candle", "lantern",
        "mirror", "window", "door", "key", "basket", "bucket", "box", "ball", "globe",
        "map", "telescope", "sword", "shield", "crown", "treasure chest", "skull",
    ],
    "vehicle": [
        "car", "sports car", "vintage car", "pickup truck", "truck", "bus", "school bus",
        "taxi", "motorcycle", "scooter", "bicycle", "tractor", "train", "steam locomotive",
        "tram", "van", "camper van", "fire truck", "ambulance", "race car", "jeep", "tank",
    ],
    "boat": [
        "sailboat", "rowing boat", "fishing boat", "yacht", "ship", "cargo ship",
        "submarine", "canoe", "kayak", "ferry", "pirate ship", "gondola",
    ],
    "aircraft": [
        "airplane", "jet", "helicopter", "hot air balloon", "glider", "biplane", "rocket",
        "spaceship", "blimp", "drone",
    ],
    "food": [
        "pizza", "burger", "sandwich", "bowl of ramen", "bowl of soup", "plate of pasta",
        "salad", "sushi platter", "taco", "burrito", "steak", "roast chicken", "pancakes",
        "waffles", "croissant", "loaf of bread", "bagel", "donut", "cupcake",
        "birthday cake", "chocolate cake", "cheesecake", "slice of pie", "ice cream cone",
        "bowl of fruit", "apple", "banana", "orange", "lemon", "strawberry", "watermelon",
        "pineapple", "avocado toast", "cup of coffee", "latte", "cup of tea", "smoothie",
        "glass of wine", "pint of beer", "cocktail", "bowl of rice", "curry", "dumplings",
        "fried eggs", "cheese board", "bowl of cereal", "plate of cookies",
    ],
    "building": [
        "house", "cottage", "cabin", "farmhouse", "barn", "castle", "palace", "cathedral",
        "church", "temple", "mosque", "pagoda", "lighthouse", "windmill", "skyscraper",
        "office building", "apartment building", "tower", "bridge", "train station",
        "library", "museum", "school", "hospital", "cafe", "restaurant", "bakery",
        "bookstore", "shop front", "treehouse", "ruins", "greenhouse", "factory",
        "stadium", "villa", "beach house", "mansion", "hut", "igloo", "tent",
    ],
    "plant": [
        "tree", "oak tree", "pine tree", "palm tree", "cherry blossom tree", "willow tree",
        "bonsai tree", "cactus", "succulent", "fern", "rose", "bouquet of roses", "tulip",
        "sunflower", "daisy", "lily", "orchid", "lavender", "field of sunflowers",
        "potted plant", "houseplant", "mushroom", "bamboo", "ivy", "maple leaf",
        "bunch of wildflowers", "vine", "moss", "lotus flower", "poppy",
    ],
    "landscape": [
        "mountain range", "snowy mountain", "valley", "canyon", "desert", "sand dunes",
        "forest", "rainforest", "pine forest", "beach", "coastline", "cliff", "waterfall",
        "river", "lake", "ocean", "bay", "island", "glacier", "volcano", "meadow",
        "rolling hills", "wheat field", "rice terraces", "vineyard", "swamp", "cave",
        "fjord", "countryside", "city skyline", "harbor", "village", "small town",
        "city street", "alley", "park", "garden", "road through the hills", "night sky",
        "starry sky", "milky way", "sunset over the sea", "coral reef",
    ],
}

# How often each kind of subject is drawn (people and animals dominate real captions).
KIND_WEIGHTS = {
    "person": 20, "animal": 20, "object": 13, "vehicle": 6, "boat": 2.5, "aircraft": 2.5,
    "food": 10, "building": 9, "plant": 7, "landscape": 10,
}
# Landscape entries that are grammatically plural (no "a" in front of them).
PLURAL_SUBJECTS = {"rolling hills", "sand dunes", "rice terraces"}

# Attributes that can precede a subject (chosen per kind).
COLOURS = [
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "white", "black",
    "brown", "grey", "gold", "silver", "teal", "turquoise", "navy blue", "dark green",
    "light blue", "beige", "cream", "crimson", "maroon", "lavender", "mint green",
    "pastel pink", "rust", "bronze", "copper", "ivory", "charcoal", "olive",
]
MATERIALS = [
    "wooden", "metal", "glass", "ceramic", "plastic", "leather", "stone", "marble",
    "porcelain", "paper", "cardboard", "wicker", "velvet", "wool", "knitted", "cotton",
    "rusty", "chrome", "brass", "concrete", "crystal", "bamboo", "clay", "golden",
]
SIZES = ["tiny", "small", "little", "large", "big", "huge", "giant", "miniature", "tall"]
AGES = ["old", "ancient", "vintage", "antique", "modern", "futuristic", "new", "retro",
        "weathered", "abandoned", "brand new", "medieval", "victorian"]
PERSON_MOODS = ["happy", "sad", "lonely", "cheerful", "calm", "angry", "sleepy", "curious",
                "mysterious", "elegant", "beautiful", "fierce", "proud", "nervous"]
MOODS = ["happy", "sad", "lonely", "cheerful", "calm", "peaceful", "angry", "sleepy",
         "curious", "playful", "mysterious", "majestic", "cozy", "gloomy", "serene",
         "dramatic", "whimsical", "cute", "fierce", "elegant", "beautiful", "surreal"]
PERSON_TRAITS = ["smiling", "young", "elderly", "tired", "laughing", "serious", "bearded",
                 "red-haired", "blonde", "curly-haired", "tall", "happy", "thoughtful"]
ANIMAL_TRAITS = ["fluffy", "wild", "baby", "sleepy", "spotted", "striped", "furry",
                 "tiny", "majestic", "curious", "playful", "wet", "hungry", "white"]
FOOD_TRAITS = ["fresh", "homemade", "delicious", "steaming", "spicy", "sweet", "healthy",
               "freshly baked", "colorful", "gourmet", "vegan", "crispy", "warm"]
PLANT_TRAITS = ["blooming", "wilted", "tall", "small", "flowering", "lush", "dried",
                "potted", "wild", "young", "ancient", "giant", "autumn"]
LANDSCAPE_TRAITS = ["misty", "foggy", "snowy", "frozen", "sunlit", "lush", "green",
                    "rocky", "vast", "quiet", "remote", "beautiful", "dramatic", "tropical",
                    "autumn", "golden", "empty", "wild"]

# ---------------------------------------------------------------------------------------
# Actions / states per kind ("a dog running on the beach"). For objects, food, buildings
# and plants the "action" already says where the thing is, so no extra place is added.
# ---------------------------------------------------------------------------------------
ACTIONS = {
    "person": [
        "reading a book", "drinking coffee", "walking", "running", "smiling at the camera",
        "looking out of a window", "playing the guitar", "riding a bicycle", "cooking",
        "dancing", "sitting on a bench", "holding an umbrella", "taking a photo",
        "working on a laptop", "talking on the phone", "laughing", "sleeping", "painting",
        "writing in a notebook", "carrying a backpack", "waving", "jumping", "standing",
        "looking at the stars", "holding a cup of tea", "wearing a hat", "fishing",
        "walking a dog", "playing chess", "meditating", "singing", "shopping",
    ],
    "animal": [
        "sleeping", "running", "sitting", "playing", "jumping", "swimming", "flying",
        "eating", "looking at the camera", "lying in the sun", "hiding", "walking",
        "resting", "drinking water", "yawning", "curled up", "standing", "hunting",
        "playing with a ball", "wearing a tiny hat", "looking up", "peeking out",
    ],
    "object": [
        "on a table", "on a shelf", "on the floor", "on a wooden desk", "in a window",
        "next to a lamp", "lying in the grass", "floating in the air", "covered in dust",
        "in the corner of a room", "on a white background", "in a glass case",
    ],
    "vehicle": [
        "parked", "driving", "speeding", "covered in snow", "rusting", "with its lights on",
        "moving fast", "waiting", "covered in mud", "with a dent", "being washed",
    ],
    "boat": [
        "sailing", "anchored", "moored", "drifting", "at full speed", "rusting",
        "with white sails", "half sunk", "leaving port",
    ],
    "aircraft": [
        "flying", "taking off", "landing", "hovering", "soaring", "parked", "in flight",
        "leaving a trail",
    ],
    "food": [
        "on a plate", "on a wooden table", "on a white plate", "in a bowl",
        "on a cutting board", "served on a tray", "on a marble countertop",
        "with a cup of coffee", "on a picnic blanket", "in a paper box",
    ],
    "building": [
        "at the end of the road", "on a hill", "by the lake", "in the forest",
        "on a cliff", "surrounded by trees", "in the middle of a field", "by the sea",
        "covered in ivy", "lit up", "under construction", "in the mountains",
    ],
    "plant": [
        "in a pot", "in a garden", "on a windowsill", "in a field", "in a vase",
        "growing on a rock", "in the sunlight", "in the rain", "by a fence",
    ],
    "landscape": [""],  # landscapes take no action
}

PLACES = [
    "in a park", "on a beach", "in the city", "on a busy street", "in a forest",
    "in a kitchen", "in a living room", "in a bedroom", "in a cafe", "in a library",
    "in a garden", "in the mountains", "by the lake", "in the desert", "in the snow",
    "on a rooftop", "in a field", "at the market", "in the rain", "on a farm",
    "in a studio", "in space", "on the moon", "underwater", "in a classroom",
    "at the beach", "in a subway station", "on a bridge", "in a meadow", "in a castle",
    "in an office", "at a train station", "in the backyard", "on a balcony", "in a cave",
    "in a small village", "on a country road", "in a greenhouse", "at a festival",
]
VEHICLE_PLACES = [
    "on the street", "on a country road", "on the highway", "in a garage", "on a bridge",
    "in the desert", "in the snow", "at a gas station", "in a parking lot", "in the city",
    "by the sea", "in the mountains", "in a field", "at the harbor", "in the sky",
    "on a racetrack", "in front of a house", "on a dirt road", "in the rain",
]
BOAT_PLACES = [
    "on the sea", "on a lake", "in a harbor", "on a calm river", "near the coast",
    "in the fog", "on rough waves", "at the dock", "in a canal", "on the ocean",
]
AIRCRAFT_PLACES = [
    "in the sky", "above the clouds", "over the city", "over the mountains",
    "over the sea", "at the airport", "over a desert", "in space", "over a forest",
]
LOCATIVE_KINDS = {"object", "food", "building", "plant", "landscape"}
INDOOR_PLACES = ["in a kitchen", "in a living room", "in a bedroom", "in a cafe",
                 "in a library", "in a studio", "in a classroom", "in an office",
                 "in a restaurant", "in a bakery", "in a museum", "in a workshop"]
TIMES = [
    "at sunset", "at sunrise", "at night", "at dawn", "at dusk", "in the morning",
    "in the afternoon", "during golden hour", "during blue hour", "at midnight",
    "on a rainy day", "on a sunny day", "on a foggy morning", "in winter", "in autumn",
    "in spring", "in summer", "during a storm", "under a full moon",
    "under a cloudy sky", "under the stars", "after the rain",
]

# ---------------------------------------------------------------------------------------
# Media, styles and modifiers.
# ---------------------------------------------------------------------------------------
# Media prefixes and style modifiers come in three families (photo, art, render) so that a
# long prompt stays roughly coherent ("a photo of ..., 85mm, bokeh" rather than
# "a photo of ..., oil on canvas"); GENERIC_MODS fit any family.
MEDIA = {
    "photo": [
        "a photo of", "a photograph of", "a close-up photo of", "a picture of",
        "an image of", "a blurry photo of", "a black and white photo of", "a polaroid of",
        "a macro photo of", "an aerial photo of", "a drone shot of", "a selfie of",
        "a cinematic still of", "a candid photo of", "a film photo of",
    ],
    "art": [
        "an oil painting of", "a watercolor of", "a watercolor painting of", "a sketch of",
        "a pencil drawing of", "a charcoal drawing of", "an illustration of",
        "a cartoon of", "a digital painting of", "a vector illustration of", "a linocut of",
        "a woodblock print of", "a mosaic of", "a stained glass window of",
        "a comic book panel of", "an anime drawing of", "a children's book illustration of",
        "a vintage postcard of", "a poster of", "a painting of", "a tattoo design of",
        "an embroidery of", "a paper cutout of", "a crayon drawing of", "an ink drawing of",
    ],
    "render": [
        "a 3d render of", "a pixel art of", "a low poly model of", "a claymation still of",
        "a rendering of", "a sculpture of", "an isometric render of", "a 3d model of",
        "a video game screenshot of", "a miniature diorama of",
    ],
}
MEDIA_PREFIXES = MEDIA["photo"] + MEDIA["art"] + MEDIA["render"]
FAMILY_MODS = {
    "photo": [
        "studio lighting", "soft lighting", "natural light", "backlit", "golden hour",
        "35mm", "35mm film", "50mm lens", "85mm", "f/1.8", "bokeh",
        "shallow depth of field", "wide angle", "telephoto", "long exposure", "macro",
        "tilt shift", "hdr", "photorealistic", "hyperrealistic", "realistic",
        "award winning photography", "national geographic", "editorial photo",
        "fashion photography", "portrait photography", "street photography",
        "film grain", "kodak portra 400", "analog photo", "depth of field", "sharp focus",
        "wes anderson color palette", "candid", "documentary photography", "raw photo",
    ],
    "art": [
        "trending on artstation", "concept art", "matte painting", "digital art",
        "fantasy", "impressionism", "expressionism", "surrealism", "pop art", "ukiyo-e",
        "baroque", "renaissance painting", "studio ghibli style", "art nouveau",
        "art deco", "flat design", "line art", "watercolor", "oil on canvas",
        "acrylic painting", "gouache", "ink wash", "pastel drawing", "storybook",
        "in the style of van gogh", "in the style of monet", "in the style of rembrandt",
        "in the style of hokusai", "in the style of vermeer", "inspired by klimt",
        "loose brushstrokes", "thick impasto", "textured paper", "children's book",
    ],
    "render": [
        "octane render", "unreal engine", "3d render", "ray tracing", "cgi",
        "global illumination", "subsurface scattering", "isometric", "pixar style",
        "cel shaded", "low poly", "blender", "claymation", "toy-like", "smooth plastic",
        "soft shadows", "clay render", "physically based rendering",
    ],
}
GENERIC_MODS = [
    "highly detailed", "ultra detailed", "intricate details", "dramatic lighting",
    "cinematic lighting", "volumetric lighting", "rim lighting", "4k", "8k",
    "high resolution", "vibrant colors", "muted colors", "pastel colors", "monochrome",
    "sepia", "high contrast", "low key", "minimalist", "symmetrical", "centered",
    "rule of thirds", "epic composition", "masterpiece", "best quality", "dreamy",
    "moody", "atmospheric", "ethereal", "sci-fi", "cyberpunk", "steampunk", "vintage",
    "retro", "clean background", "white background", "on a black background",
    "detailed texture", "soft focus", "cinematic", "beautiful", "cozy atmosphere",
    "warm tones", "cool tones", "centered composition",
]
STYLE_MODIFIERS = FAMILY_MODS["photo"] + FAMILY_MODS["art"] + FAMILY_MODS["render"] + GENERIC_MODS
CAMERA_TERMS = ["shot on a dslr", "shot on iphone", "canon eos", "nikon d850",
                "fujifilm", "leica", "hasselblad", "gopro footage", "drone photography",
                "disposable camera", "polaroid", "35mm film photo", "medium format"]
STOCK_PREFIXES = [
    "", "", "", "close-up of", "portrait of", "aerial view of", "view of",
    "stock photo of", "top view of", "side view of", "silhouette of", "detail of",
    "vintage photo of", "illustration of", "cartoon", "vector", "watercolor",
    "panorama of", "beautiful", "rear view of",
]
LAION_SUFFIXES = [
    "", "", "", "", " - stock photo", " - stock image", " stock photo",
    " - royalty free stock photo", " | free photo", " wallpaper", " hd wallpaper",
    " poster", " print", " canvas print", " - vector illustration", " - image",
    " | photography", " framed print", " - illustration", " photo",
]
PLACE_NAMES = [
    "paris", "tokyo", "new york", "london", "rome", "venice", "iceland", "norway",
    "scotland", "kyoto", "bali", "california", "the alps", "patagonia", "morocco",
    "greece", "santorini", "istanbul", "amsterdam", "prague", "barcelona", "lisbon",
    "new zealand", "the sahara", "alaska", "the grand canyon", "yosemite", "hawaii",
]

# ---------------------------------------------------------------------------------------
# Product listings. Each product kind has its own materials, adjectives and size specs,
# so that titles stay plausible ("Women's Linen Summer Dress - Sage Green - Size M").
# ---------------------------------------------------------------------------------------
PRODUCTS = {
    "apparel": ["T-Shirt", "Hoodie", "Sweater", "Denim Jacket", "Rain Jacket",
                "Summer Dress", "Maxi Skirt", "Chino Pants", "Polo Shirt", "Cardigan",
                "Pajama Set", "Beanie", "Scarf"],
    "shoes": ["Running Shoes", "Ankle Boots", "Sneakers", "Sandals", "Loafers",
              "Hiking Boots", "Slippers", "Ballet Flats"],
    "kitchen": ["Coffee Mug", "Water Bottle", "Travel Tumbler", "Cutting Board",
                "Frying Pan", "Dinner Plate", "Salad Bowl", "Teapot", "Serving Tray",
                "Spice Jar", "Mixing Bowl"],
    "home": ["Throw Pillow Cover", "Wall Clock", "Area Rug", "Picture Frame", "Bath Towel",
             "Duvet Cover", "Scented Candle", "Flower Vase", "Table Runner", "Planter",
             "Throw Blanket"],
    "furniture": ["Bookshelf", "Office Chair", "Coffee Table", "Bar Stool", "Nightstand",
                  "Desk", "Side Table", "Dining Chair", "TV Stand"],
    "bag": ["Backpack", "Tote Bag", "Crossbody Bag", "Laptop Sleeve", "Wallet",
            "Duffel Bag", "Messenger Bag"],
    "tech": ["Phone Case", "Wireless Earbuds", "Charging Cable", "Desk Lamp",
             "Bluetooth Speaker", "Mechanical Keyboard", "Power Bank", "Laptop Stand"],
    "art": ["Wall Art Print", "Canvas Print", "Poster", "Greeting Card", "Sticker",
            "Enamel Pin", "Art Print", "Postcard Set"],
    "jewelry": ["Stud Earrings", "Pendant Necklace", "Bracelet", "Ring", "Hoop Earrings",
                "Charm Necklace"],
}
PRODUCT_MATERIALS = {
    "apparel": ["Cotton", "Organic Cotton", "Linen", "Wool", "Merino Wool", "Fleece",
                "Denim", "Velvet", "Knit"],
    "shoes": ["Leather", "Faux Leather", "Suede", "Canvas", "Mesh", "Knit"],
    "kitchen": ["Ceramic", "Stoneware", "Stainless Steel", "Glass", "Bamboo", "Acacia Wood",
                "Cast Iron", "Enamel", "Porcelain"],
    "home": ["Cotton", "Linen", "Ceramic", "Glass", "Velvet", "Wool", "Jute", "Macrame",
             "Terracotta"],
    "furniture": ["Oak", "Walnut", "Solid Wood", "Metal", "Rattan", "Velvet", "Pine",
                  "Marble Top"],
    "bag": ["Leather", "Canvas", "Nylon", "Faux Leather", "Waxed Canvas", "Cork"],
    "tech": ["Silicone", "Aluminum", "Leather", "Clear", "Braided"],
    "art": ["Botanical", "Abstract", "Watercolor", "Line Art", "Vinyl", "Matte", "Floral"],
    "jewelry": ["Sterling Silver", "Gold Plated", "Rose Gold", "Pearl", "Brass",
                "Stainless Steel"],
}
PRODUCT_ADJ = {
    "any": ["Handmade", "Vintage", "Minimalist", "Classic", "Modern", "Personalized",
            "Premium", "Custom", "Retro", "Boho", "Scandinavian", "Eco-Friendly"],
    "apparel": ["Slim Fit", "Oversized", "Relaxed Fit", "Lightweight", "Cropped"],
    "shoes": ["Waterproof", "Lightweight", "Non-Slip", "Wide Fit"],
    "kitchen": ["Reusable", "Insulated", "Dishwasher Safe", "Nonstick", "Rustic"],
    "home": ["Rustic", "Cozy", "Farmhouse", "Decorative"],
    "furniture": ["Rustic", "Industrial", "Mid-Century", "Foldable", "Farmhouse"],
    "bag": ["Waterproof", "Lightweight", "Foldable", "Anti-Theft"],
    "tech": ["Portable", "Wireless", "Fast Charging", "Slim", "Rugged"],
    "art": ["Framed", "Printable", "Colorful", "Nursery"],
    "jewelry": ["Dainty", "Delicate", "Layered", "Hypoallergenic"],
}
PRODUCT_COLOURS = [
    "Black", "White", "Navy", "Grey", "Beige", "Olive Green", "Burgundy", "Mustard Yellow",
    "Sage Green", "Dusty Pink", "Sky Blue", "Charcoal", "Terracotta", "Cream", "Brown",
    "Red", "Forest Green", "Natural",
]
PRODUCT_AUDIENCE = ["Men's", "Women's", "Kids'", "Unisex", "Baby", "Girls'", "Boys'", ""]


def product_spec(kind: str, noun: str, rng: random.Random) -> str:
    """A size/spec fragment that fits the product, often with numbers."""
    if kind == "apparel":
        return "Size " + rng.choice(["XS", "S", "M", "L", "XL", "XXL", "2T", "4T", "10-12"])
    if kind == "shoes":
        return rng.choice(["Size ", "US ", "EU "]) + rng.choice(
            ["5", "6", "6.5", "7", "7.5", "8", "9", "10", "11", "38", "40", "42", "44"])
    if kind == "kitchen":
        return rng.choice([f"{rng.choice([8, 10, 12, 16, 20, 24, 32])} oz",
                           f"{rng.choice([350, 500, 750, 1000])} ml",
                           f"{rng.choice([8, 10, 12])} inch",
                           f"Set of {rng.choice([2, 4, 6])}"])
    if kind == "home":
        a, b = rng.choice([(18, 18), (20, 20), (16, 24), (5, 7), (8, 10), (30, 56), (60, 90)])
        return rng.choice([f"{a} x {b} inch", f"{a}x{b}", f"Set of {rng.choice([2, 3, 4])}",
                           f"{rng.choice([40, 50, 60, 120])} cm"])
    if kind == "furniture":
        return rng.choice([f"{rng.choice([24, 30, 36, 48, 60])} inch",
                           f"{rng.choice([80, 100, 120, 160])} cm Wide", "Easy Assembly",
                           f"Set of {rng.choice([2, 4])}"])
    if kind == "bag":
        return rng.choice([f"fits {rng.choice([13, 14, 15.6, 17])} inch Laptop",
                           f"{rng.choice([20, 25, 30, 40])}L", "Large Capacity"])
    if kind == "tech":
        specs = {
            "Charging Cable": [f"{rng.choice([3, 6, 10])} ft", f"{rng.choice([1, 2])}m",
                               "USB-C", f"{rng.choice([60, 100])}W"],
            "Power Bank": [f"{rng.choice([5000, 10000, 20000])}mAh", "USB-C"],
            "Wireless Earbuds": [f"{rng.choice([24, 30, 40])}-Hour Battery", "Noise Cancelling"],
            "Bluetooth Speaker": [f"{rng.choice([10, 20, 30])}W", "IPX7", "12-Hour Battery"],
            "Phone Case": ["with Card Holder", "Shockproof", "MagSafe Compatible"],
            "Mechanical Keyboard": [f"{rng.choice([60, 75, 87, 104])} Keys", "Hot-Swappable"],
            "Laptop Stand": ["Adjustable", "for 10-17 inch Laptops", "Aluminum Alloy"],
            "Desk Lamp": ["Dimmable", "LED", f"{rng.choice([3, 5])} Color Modes"],
        }
        return rng.choice(specs.get(noun, [""]))
    if kind == "art":
        a, b = rng.choice([(8, 10), (11, 14), (12, 16), (16, 20), (18, 24), (24, 36), (5, 7)])
        return rng.choice([f"{a}x{b}", f"{a} x {b} inches", "A4", "A3", "Unframed"])
    if kind == "jewelry":
        return rng.choice([f"{rng.choice([16, 18, 20])} inch Chain", "Gift for Her",
                           "Gift for Him", "Gift Box", "Tarnish Resistant"])
    return ""


# ---------------------------------------------------------------------------------------
# Toy world vocabulary (matches the project's tiny test world).
# ---------------------------------------------------------------------------------------
TOY_OBJECTS = ["ball", "box", "car", "house", "tree", "cat", "dog"]
TOY_COLOURS = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "white",
               "black", "brown", "grey"]
TOY_PATTERNS = ["solid", "striped", "dotted", "checkered"]
TOY_SCENES = ["on grass", "on a beach", "in the snow", "at night", "in the desert",
              "on the water"]
TOY_RELATIONS = ["next to", "behind", "in front of", "near", "beside", "on top of",
                 "to the left of", "to the right of"]
TOY_MEDIA = ["a photo of", "a picture of", "a render of", "a drawing of", "an image of",
             "a toy photo of", "a simple 3d render of"]

# ---------------------------------------------------------------------------------------
# Small grammar helpers.
# ---------------------------------------------------------------------------------------
NUMBER_WORDS = ["two", "three", "four", "five", "six", "seven", "eight", "ten", "twelve"]
IRREGULAR_PLURALS = {
    "woman": "women", "man": "men", "child": "children", "old man": "old men",
    "old woman": "old women", "young woman": "young women", "young man": "young men",
    "businessman": "businessmen", "businesswoman": "businesswomen",
    "fisherman": "fishermen", "police officer": "police officers", "sheep": "sheep",
    "goose": "geese", "deer": "deer", "mouse": "mice", "wolf": "wolves", "knife": "knives",
    "leaf": "leaves", "maple leaf": "maple leaves", "fish": "fish", "goldfish": "goldfish",
    "cactus": "cacti", "samurai": "samurai", "moss": "moss", "bamboo": "bamboo",
    "sushi platter": "sushi platters", "ivy": "ivy",
}


def plural(noun: str) -> str:
    if noun in IRREGULAR_PLURALS:
        return IRREGULAR_PLURALS[noun]
    if " of " in noun:  # "bowl of soup" -> "bowls of soup"
        head, tail = noun.split(" of ", 1)
        return plural(head) + " of " + tail
    if noun.startswith("pair"):
        return "pairs" + noun[4:]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def article(phrase: str) -> str:
    """'a' or 'an' in front of a phrase, by its first sound (approximately)."""
    word = phrase.split()[0].lower()
    if word.startswith(("uni", "use", "usb", "eu")) or word in {"one"}:
        return "a " + phrase
    if word in {"hour", "honest", "hdr", "8k"} or word[0] in "aeiou":
        return "an " + phrase
    return "a " + phrase


def pick_modifier(kind: str, rng: random.Random) -> str:
    """One attribute that makes sense for the subject kind (possibly empty)."""
    if rng.random() < 0.3:
        return ""
    if kind == "person":
        return rng.choice(PERSON_TRAITS + PERSON_MOODS)
    if kind == "animal":
        return rng.choice(ANIMAL_TRAITS + MOODS + COLOURS[:12])
    if kind == "food":
        return rng.choice(FOOD_TRAITS)
    if kind == "plant":
        return rng.choice(PLANT_TRAITS + COLOURS[:12])
    if kind == "landscape":
        return rng.choice(LANDSCAPE_TRAITS + MOODS)
    if kind == "building":
        return rng.choice(AGES + SIZES + COLOURS + ["stone", "wooden", "brick", "glass"])
    # object / vehicle / boat / aircraft
    pool = rng.choice([COLOURS, MATERIALS, SIZES, AGES])
    word = rng.choice(pool)
    if rng.random() < 0.25:  # two stacked attributes, e.g. "small red"
        second = rng.choice(COLOURS)
        if second != word:
            word = rng.choice(SIZES + AGES) + " " + second
    return word


def noun_phrase(rng: random.Random, kinds=None, allow_number=True):
    """Return (phrase, kind, is_plural), e.g. ('a fluffy cat', 'animal', False)."""
    kinds = kinds or list(KIND_WEIGHTS)
    kind = rng.choices(kinds, weights=[KIND_WEIGHTS[k] for k in kinds])[0]
    noun = rng.choice(SUBJECTS[kind])
    mod = pick_modifier(kind, rng)
    head = f"{mod} {noun}" if mod else noun
    if allow_number and kind not in ("landscape",) and rng.random() < 0.12:
        count = rng.choice(NUMBER_WORDS[:5])
        pl = f"{mod} {plural(noun)}" if mod else plural(noun)
        return f"{count} {pl}", kind, True
    if noun in PLURAL_SUBJECTS:
        return ("the " if rng.random() < 0.5 else "") + head, kind, True
    if kind == "landscape" and rng.random() < 0.5:
        return "the " + head, kind, False
    return article(head), kind, False


def action_for(kind: str, rng: random.Random) -> str:
    return rng.choice(ACTIONS[kind])


def place_for(kind: str, rng: random.Random) -> str:
    """A place for people, animals and vehicles; others get theirs from action_for."""
    if kind in LOCATIVE_KINDS:
        return ""
    if kind == "vehicle":
        return rng.choice(VEHICLE_PLACES)
    if kind == "boat":
        return rng.choice(BOAT_PLACES)
    if kind == "aircraft":
        return rng.choice(AIRCRAFT_PLACES)
    return rng.choice(PLACES)


def situate(kind: str, rng: random.Random, p_place: float = 0.7) -> str:
    """Action plus (for people, animals, vehicles, sometimes) a place."""
    if kind == "landscape":
        return ""
    action = action_for(kind, rng)
    return join(action, place_for(kind, rng) if rng.random() < p_place else "")


def join(*parts: str) -> str:
    return " ".join(p for p in parts if p).replace("  ", " ").strip()


def capitalize_first(text: str) -> str:
    return text[:1].upper() + text[1:]


# ---------------------------------------------------------------------------------------
# Prompt styles.
# ---------------------------------------------------------------------------------------
def make_short(rng: random.Random) -> str:
    """Short captions: 'a red car', 'a sleeping cat on a sofa', 'the beach at sunset'."""
    phrase, kind, _ = noun_phrase(rng)
    form = rng.randrange(6)
    if form == 0:
        return phrase
    if form == 1:
        return join(phrase, action_for(kind, rng) or rng.choice(TIMES))
    if form == 2:
        return join(phrase, rng.choice(TIMES))
    if form == 3:
        return join(phrase, situate(kind, rng, p_place=1.0) or rng.choice(TIMES))
    if form == 4:
        return join(rng.choice(MEDIA_PREFIXES), phrase)
    # form 5: noun with one adjective and no article, as in many alt texts
    noun = rng.choice(SUBJECTS[kind])
    return join(pick_modifier(kind, rng) or rng.choice(MOODS), noun)


def landscape_with_article(rng: random.Random) -> str:
    noun = rng.choice(SUBJECTS["landscape"])
    phrase = rng.choice(LANDSCAPE_TRAITS) + " " + noun
    return phrase if noun in PLURAL_SUBJECTS else article(phrase)


def strip_article(phrase: str) -> str:
    for art in ("a ", "an ", "the "):
        if phrase.startswith(art):
            return phrase[len(art):]
    return phrase


def make_medium(rng: random.Random) -> str:
    """LAION-like alt texts, roughly 5-20 words."""
    phrase, kind, _ = noun_phrase(rng)
    bare = strip_article(phrase)
    form = rng.randrange(8)
    if form == 0:
        text = join(rng.choice(STOCK_PREFIXES), bare, situate(kind, rng))
    elif form == 1:
        text = join(rng.choice(MEDIA_PREFIXES), phrase, action_for(kind, rng),
                    rng.choice(TIMES))
    elif form == 2:
        other, _, _ = noun_phrase(rng, kinds=["person", "animal", "object", "vehicle",
                                              "plant", "building"], allow_number=False)
        text = join(phrase, rng.choice(["and", "with", "next to", "in front of", "behind"]),
                    other, rng.choice(PLACES) if kind not in LOCATIVE_KINDS else "")
    elif form == 3:
        text = join(rng.choice(STOCK_PREFIXES), bare, "in", rng.choice(PLACE_NAMES))
        if rng.random() < 0.5:
            text = join(text, rng.choice(TIMES))
    elif form == 4:
        text = join(phrase, situate(kind, rng), rng.choice(TIMES))
    elif form == 5:
        text = join(rng.choice(["view of", "landscape with", "scenery of", "photo of"]),
                    landscape_with_article(rng), rng.choice(["and", "with"]),
                    article(rng.choice(SUBJECTS["building"])), rng.choice(TIMES))
    elif form == 6:
        text = join(phrase, situate(kind, rng)) + ", " + rng.choice(STYLE_MODIFIERS)
    else:
        text = join("this", pick_modifier(kind, rng), rng.choice(SUBJECTS[kind]), rng.choice(
            ["will make you smile", "is the perfect gift", "is so relaxing",
             "looks like a painting", "is everything", "made my day", "was spotted today",
             "is stunning", "needs a name", "is my new favorite thing"]))
    text += rng.choice(LAION_SUFFIXES)
    if rng.random() < 0.35:
        text = capitalize_first(text)
    return text


def make_long(rng: random.Random) -> str:
    """Prompt-engineering style: a scene, then comma-separated modifiers (<= 60 words)."""
    family = rng.choice(["photo", "photo", "art", "art", "render"])
    phrase, kind, _ = noun_phrase(rng)
    head = join(rng.choice(MEDIA[family]) if rng.random() < 0.6 else "", phrase,
                situate(kind, rng), rng.choice(TIMES) if rng.random() < 0.6 else "")
    parts = [head]
    if rng.random() < 0.4:
        other, _, _ = noun_phrase(rng, kinds=["person", "animal", "object", "plant",
                                              "building", "vehicle"], allow_number=False)
        parts.append(join(rng.choice(["with", "and", "next to", "surrounded by"]), other))
    if rng.random() < 0.4:
        parts.append(rng.choice(COLOURS) + " and " + rng.choice(COLOURS) + " color scheme")
    n_family = rng.randint(2, 6)
    n_generic = rng.randint(2, 6)
    mods = rng.sample(FAMILY_MODS[family], n_family) + rng.sample(GENERIC_MODS, n_generic)
    rng.shuffle(mods)
    parts += mods
    if family == "photo" and rng.random() < 0.3:
        parts.append(rng.choice(CAMERA_TERMS))
    text = ", ".join(parts)
    # Enforce the length limits by dropping trailing modifiers.
    while (len(text) > MAX_CHARS or len(text.split()) > MAX_WORDS) and len(parts) > 2:
        parts.pop()
        text = ", ".join(parts)
    return text


def make_product(rng: random.Random) -> str:
    """Product-listing alt texts, title case, often with sizes and numbers."""
    kind = rng.choice(list(PRODUCTS))
    noun = rng.choice(PRODUCTS[kind])
    audience = rng.choice(PRODUCT_AUDIENCE) if kind in ("apparel", "shoes") else ""
    adjective = rng.choice(PRODUCT_ADJ["any"] + PRODUCT_ADJ[kind]) if rng.random() < 0.6 else ""
    material = rng.choice(PRODUCT_MATERIALS[kind]) if rng.random() < 0.7 else ""
    title = join(audience, adjective, material, noun)
    extras = []
    if kind not in ("art", "jewelry") and rng.random() < 0.75:
        extras.append(rng.choice(PRODUCT_COLOURS))
    if rng.random() < 0.8:
        extras.append(product_spec(kind, noun, rng))
    sep = rng.choice([", ", " - ", " | ", " "])
    text = sep.join([title] + [e for e in extras if e])
    if rng.random() < 0.2:
        text = rng.choice(["New ", "Set of 2 ", "Pack of 3 ", "Sale: "]) + text
    if rng.random() < 0.15:
        text += rng.choice([" (Free Shipping)", " - Gift Idea", " - Made in Portugal",
                            " - Ready to Ship", f" - {rng.choice([10, 20, 30, 50])}% Off"])
    return text


def make_numbered(rng: random.Random) -> str:
    """Captions with digits: years, counts, resolutions, file names, listicles."""
    phrase, kind, _ = noun_phrase(rng, allow_number=False)
    bare = strip_article(phrase)
    noun = rng.choice(SUBJECTS[kind])
    form = rng.randrange(7)
    if form == 0:
        return join(str(rng.randint(2, 12)), plural(noun), situate(kind, rng))
    if form == 1:
        return join(bare, rng.choice(PLACE_NAMES), str(rng.randint(1950, 2023)))
    if form == 2:
        w, h = rng.choice([(1920, 1080), (2560, 1440), (3840, 2160), (1280, 720), (1024, 768)])
        return join(bare, "wallpaper", f"{w}x{h}")
    if form == 3:
        return join("the", rng.choice(["1920s", "1950s", "1960s", "1970s", "1980s", "1990s"]),
                    bare, rng.choice(["", "photo", "illustration", "advertisement", "poster"]))
    if form == 4:
        return join(capitalize_first(bare), "-", f"IMG_{rng.randint(1000, 9999)}.jpg")
    if form == 5:
        return join(str(rng.randint(2, 30)),
                    rng.choice(["best", "beautiful", "amazing", "cute", "easy"]), plural(noun),
                    rng.choice(["ideas", "photos", "pictures", "you need to see",
                                "for " + str(rng.randint(2015, 2024))]))
    return join(f"day {rng.randint(1, 365)}:", phrase,
                situate(kind, rng) or rng.choice(TIMES))


def toy_object(rng: random.Random, allow_pattern=True) -> str:
    colour = rng.choice(TOY_COLOURS)
    obj = rng.choice(TOY_OBJECTS)
    if allow_pattern and rng.random() < 0.45:
        return article(f"{rng.choice(TOY_PATTERNS)} {colour} {obj}")
    return article(f"{colour} {obj}")


def make_toy(rng: random.Random) -> str:
    """Toy-world prompts: 'a red ball and a blue box on a beach'."""
    form = rng.randrange(7)
    scene = rng.choice(TOY_SCENES)
    if form == 0:
        return join(toy_object(rng), scene)
    if form == 1:
        return join(toy_object(rng), "and", toy_object(rng), scene)
    if form == 2:
        return join(toy_object(rng), rng.choice(TOY_RELATIONS), toy_object(rng), scene)
    if form == 3:
        return join(rng.choice(TOY_MEDIA), toy_object(rng), scene)
    if form == 4:
        count = rng.choice(NUMBER_WORDS[:4])
        return join(count, rng.choice(TOY_COLOURS), plural(rng.choice(TOY_OBJECTS)), scene)
    if form == 5:
        return join(rng.choice(TOY_MEDIA), toy_object(rng), "and", toy_object(rng), scene)
    return join(toy_object(rng), ",", toy_object(rng), "and", toy_object(rng),
                scene).replace(" ,", ",")


MAKERS = {
    "short": make_short,
    "medium": make_medium,
    "long": make_long,
    "product": make_product,
    "numbered": make_numbered,
    "toy": make_toy,
}


def clean(text: str) -> str:
    text = " ".join(text.split())
    return text.replace(" ,", ",").strip(" ,")


def generate(seed: int = SEED) -> list[str]:
    assert sum(QUOTAS.values()) == N_PROMPTS
    rng = random.Random(seed)
    seen: set[str] = set()
    prompts: list[str] = []
    for style, quota in QUOTAS.items():  # dicts keep insertion order: deterministic
        made, attempts = 0, 0
        while made < quota:
            attempts += 1
            if attempts > quota * 200:
                raise RuntimeError(f"could not make {quota} unique '{style}' prompts")
            text = clean(MAKERS[style](rng))
            if not text or len(text) > MAX_CHARS or text.lower() in seen:
                continue
            seen.add(text.lower())
            prompts.append(text)
            made += 1
    rng.shuffle(prompts)  # interleave styles
    return prompts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-o", "--output", type=Path,
                        default=Path(__file__).resolve().parent / "corpus.txt")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args()
    prompts = generate(args.seed)
    with open(args.output, "w", encoding="utf-8", newline="\n") as fh:
        fh.write("\n".join(prompts) + "\n")
    print(f"wrote {len(prompts)} prompts to {args.output}")


if __name__ == "__main__":
    main()
