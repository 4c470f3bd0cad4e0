"""Rendered text for the OCR expert, of six kinds: signs (platform signs among them), product
labels, receipts, price tags, name badges and licence plates. Each kind draws its words from a
per-seed split of word lists, so held-out images show words never seen in train. Questions are
asked freely, as people ask them ("Where do the trains go?", "How much are the apples?", "What is
the total?"), several per image; an answer is the text read, alone or in a short sentence that
holds it exactly as printed (what reading is scored on)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from .common import RGB, SPLITS, Settings, png_digest, unique_image
from .drawing import Layout, Row, render_layout

WHITE, NEAR_BLACK = (255, 255, 255), (20, 20, 20)
SIGN_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    ((0, 122, 61), WHITE),
    ((200, 16, 46), WHITE),
    ((0, 61, 165), WHITE),
    (WHITE, NEAR_BLACK),
    ((255, 205, 0), NEAR_BLACK),
    ((25, 25, 25), WHITE),
    ((110, 60, 30), WHITE),
    ((240, 120, 0), (0, 0, 0)),
    (WHITE, (190, 0, 0)),
    ((20, 40, 90), (255, 220, 0)),
)
LABEL_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    ((250, 240, 215), (60, 30, 10)),
    (WHITE, NEAR_BLACK),
    ((205, 170, 120), (30, 20, 10)),
    ((220, 235, 250), (10, 40, 90)),
    ((225, 245, 220), (20, 70, 20)),
    ((255, 230, 235), (130, 0, 30)),
    ((40, 40, 40), (250, 230, 160)),
)
PAPER_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    (WHITE, (30, 30, 30)),
    ((250, 248, 240), (45, 45, 45)),
    ((245, 245, 245), (60, 60, 70)),
)
TAG_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    (WHITE, NEAR_BLACK),
    ((255, 235, 60), NEAR_BLACK),
    ((255, 200, 150), (120, 0, 0)),
    ((210, 245, 210), (0, 50, 0)),
    (WHITE, (170, 0, 0)),
)
BAND_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    ((200, 16, 46), WHITE),
    ((0, 61, 165), WHITE),
    ((0, 110, 55), WHITE),
    ((100, 40, 140), WHITE),
    ((20, 20, 20), (255, 220, 0)),
)
PLATE_SCHEMES: tuple[tuple[RGB, RGB], ...] = (
    ((245, 245, 245), NEAR_BLACK),
    ((250, 210, 0), NEAR_BLACK),
    (WHITE, (10, 30, 110)),
)


# Word lists. Each list is split per seed into train (80 %) and held-out (20 %) words, so held-out
# images show words never seen in train and their answers cannot have been memorised.
SIGN_PHRASES = (
    "EXIT", "STOP", "OPEN", "CLOSED", "PUSH", "PULL", "ENTRANCE", "NO ENTRY", "NO PARKING", "KEEP OUT",
    "DANGER", "CAUTION", "WET FLOOR", "QUIET PLEASE", "TOILETS", "RECEPTION", "INFORMATION", "TICKETS",
    "PHARMACY", "LIBRARY", "MUSEUM", "HOSPITAL", "POLICE", "HOTEL", "TAXI", "BUS STOP", "PARKING", "ONE WAY",
    "GIVE WAY", "SLOW", "SCHOOL ZONE", "FIRE EXIT", "EMERGENCY EXIT", "STAFF ONLY", "PRIVATE", "LOADING ZONE",
    "NO SMOKING", "DO NOT ENTER", "WELCOME", "SALE", "SOLD OUT", "OPEN 24 HOURS", "BACK IN 5 MINUTES",
    "CASH ONLY", "FREE WIFI", "LIFT", "STAIRS", "ARRIVALS", "DEPARTURES", "BAGGAGE CLAIM", "CHECK IN",
    "LOST AND FOUND", "FIRST AID", "CAFE", "RESTAURANT", "GARDEN CENTRE", "PLAYGROUND", "BEACH", "ZOO",
    "POST OFFICE", "BANK", "CINEMA", "THEATRE", "STADIUM", "STATION", "AIRPORT", "HARBOUR", "TOWN HALL",
    "CAR WASH", "BARBER", "FLORIST", "BOOKSHOP", "PET SHOP", "GYM", "SWIMMING POOL", "CAMPSITE", "VIEWPOINT",
    "PICNIC AREA", "DEAD END", "ROAD CLOSED", "DETOUR", "KEEP LEFT", "KEEP RIGHT", "NO CYCLING",
    "DOGS ON LEADS", "MIND THE GAP", "PLEASE WAIT HERE", "NOW OPEN", "COMING SOON", "HOT FOOD", "FARM SHOP",
    "VISITOR CENTRE", "BOX OFFICE", "WAITING ROOM", "LEFT LUGGAGE", "NO DIVING", "SLIPPERY ROAD",
)  # fmt: skip
NUMBERED_SIGNS = (
    ("PLATFORM {n}", 1, 24), ("GATE {l}{n}", 1, 40), ("ROOM {n}", 100, 499), ("FLOOR {n}", 1, 15),
    ("EXIT {n}", 1, 60), ("AISLE {n}", 1, 30), ("BUS {n}", 1, 199), ("ROUTE {n}", 1, 99),
    ("SPEED LIMIT {n}", 2, 7),
)  # fmt: skip
STREET_NAMES = (
    "ELM", "OAK", "MAPLE", "CEDAR", "PINE", "BIRCH", "WILLOW", "CHESTNUT", "ASH", "HAZEL", "RIVER", "LAKE",
    "HILL", "PARK", "CHURCH", "MILL", "BRIDGE", "MARKET", "HIGH", "KING", "QUEEN", "VICTORIA", "SPRING",
    "MEADOW", "ORCHARD", "OCEAN", "FOREST", "VALLEY", "SUNSET", "ROSE", "LILY", "IVY", "FERN", "CLOVER",
    "WINDSOR", "YORK", "LINCOLN", "FRANKLIN", "WASHINGTON", "JEFFERSON", "MADISON", "HAMILTON", "CARTER",
    "BADGER", "HERON", "SPARROW", "JUNIPER", "POPLAR", "LAUREL", "WALNUT",
)  # fmt: skip
STREET_KINDS = (
    "STREET", "AVENUE", "ROAD", "LANE", "DRIVE", "WAY", "PLACE", "BOULEVARD", "COURT", "CLOSE", "TERRACE",
    "CRESCENT",
)  # fmt: skip
TOWNS = (
    "ASHFORD", "BRADFIELD", "CLAYTON", "DENTON", "EASTWOOD", "FAIRVIEW", "GLENMORE", "HALIFAX", "IRVINE",
    "KENDAL", "LANGLEY", "MARLOW", "NEWPORT", "OAKHAM", "PENRITH", "REDDING", "SALEM", "THORNBURY", "UPTON",
    "WESTBURY", "BARNSTON", "CROMWELL", "DOVER", "EVERTON", "FROME", "GRANTHAM", "HOLBROOK", "KESWICK",
    "LUDLOW", "MORPETH", "NORWICH", "PRESTON", "RIPON", "SELBY", "TAUNTON", "WHITBY",
)  # fmt: skip


@dataclass(frozen=True)
class Product:
    name: str
    plural: bool
    unit: str  # "g" or "ml": how its pack size is given

    @property
    def noun(self) -> str:
        return self.name.lower()

    def costs(self, price: str) -> str:
        return f"The {self.noun} {'cost' if self.plural else 'costs'} {price}"

    def cost_question(self) -> str:
        return f"How much {'do' if self.plural else 'does'} the {self.noun} cost?"

    def how_much_question(self) -> str:
        return f"How much {'are' if self.plural else 'is'} the {self.noun}?"


_SINGULAR_DRY = (
    "SUGAR", "FLOUR", "RICE", "SALT", "COFFEE", "TEA", "COCOA", "HONEY", "JAM", "PASTA", "BARLEY", "SEMOLINA",
    "COUSCOUS", "QUINOA", "BUTTER", "CHEESE", "YOGURT", "CEREAL", "GRANOLA", "MUESLI", "CINNAMON", "PAPRIKA",
    "CUMIN", "GINGER", "GARLIC", "BASIL", "OREGANO", "THYME", "ROSEMARY", "NUTMEG", "TURMERIC", "PEPPER",
    "CHOCOLATE", "FUDGE", "TOFFEE", "POPCORN", "BREAD", "RYE BREAD", "CHICKEN", "BEEF", "SALMON", "TUNA",
    "LETTUCE", "CABBAGE", "BROCCOLI", "SPINACH", "CELERY", "MAYONNAISE", "PEANUT BUTTER", "MARGARINE",
    "BAKING SODA", "YEAST", "OATMEAL", "MUSTARD", "CORNFLOUR", "PORRIDGE",
)  # fmt: skip
_PLURAL_DRY = (
    "OATS", "BEANS", "LENTILS", "PEAS", "RAISINS", "ALMONDS", "WALNUTS", "PEANUTS", "CASHEWS", "HAZELNUTS",
    "CHICKPEAS", "NOODLES", "CRACKERS", "COOKIES", "BISCUITS", "APPLES", "BANANAS", "ORANGES", "LEMONS",
    "LIMES", "PEARS", "PLUMS", "GRAPES", "CHERRIES", "PEACHES", "TOMATOES", "POTATOES", "CARROTS", "ONIONS",
    "MUSHROOMS", "EGGS", "SUNFLOWER SEEDS", "DATES", "FIGS", "PRUNES", "OLIVES", "PICKLES", "CRISPS",
)  # fmt: skip
_LIQUID = (
    "MILK", "OLIVE OIL", "VINEGAR", "SOY SAUCE", "ORANGE JUICE", "APPLE JUICE", "LEMONADE", "WATER", "CREAM",
    "KETCHUP", "SYRUP", "MAPLE SYRUP", "COCONUT MILK", "BROTH", "TOMATO SOUP", "SUNFLOWER OIL",
)  # fmt: skip
PRODUCTS = (
    tuple(Product(n, False, "g") for n in _SINGULAR_DRY)
    + tuple(Product(n, True, "g") for n in _PLURAL_DRY)
    + tuple(Product(n, False, "ml") for n in _LIQUID)
)
PACK_SIZES = {
    "g": ("100 g", "200 g", "250 g", "400 g", "500 g", "750 g", "1 kg", "1.5 kg", "2 kg", "5 kg"),
    "ml": ("250 ml", "330 ml", "500 ml", "750 ml", "1 L", "1.5 L", "2 L"),
}
LABEL_WORDS = ("ORGANIC", "PREMIUM", "CLASSIC", "NATURAL")
STORE_WORDS = (
    "SUNNY", "FRESH", "GOLDEN", "HAPPY", "CORNER", "RIVERSIDE", "HILLTOP", "CITY", "VILLAGE", "FAMILY",
    "BRIGHT", "BLUE SKY", "NORTHSIDE", "LUCKY", "SMART", "DAILY", "URBAN", "COUNTRY", "PARKSIDE", "SEASIDE",
    "LAKESIDE", "EVERGREEN", "HARVEST", "SUNRISE", "MOONLIGHT", "PRIMROSE", "GREENWAY", "STARLIGHT",
    "HOMETOWN", "BLUEBELL",
)  # fmt: skip
STORE_KINDS = ("MARKET", "GROCER", "MART", "STORE", "FOODS", "PANTRY", "DELI", "SHOP", "SUPERMARKET", "GROCERY")
PRICE_UNITS = ("each", "per kg", "per lb", "per pack")
FIRST_NAMES = (
    "Maria", "James", "Aisha", "Chen", "Olivia", "Mateo", "Priya", "Lukas", "Sofia", "Omar", "Hannah", "Kenji",
    "Fatima", "Diego", "Emma", "Noah", "Amara", "Ivan", "Chloe", "Ravi", "Yuki", "Elena", "Samuel", "Leila",
    "Marco", "Nadia", "Oscar", "Ingrid", "Tariq", "Grace", "Hugo", "Mei", "Daniel", "Zara", "Felix", "Anika",
    "Pablo", "Sara", "Tomas", "Keiko", "Liam", "Nina", "Arjun", "Clara", "Jonas", "Rosa", "Malik", "Julia",
    "Andre", "Freya", "Kofi", "Lena", "Mohammed", "Ana", "Victor", "Ines", "Sven", "Alice", "Ibrahim", "Lucia",
    "Ethan", "Maya", "Dmitri", "Eva", "Rahul", "Nora", "Carlos", "Isla", "Hassan", "Lara", "Peter", "Rina",
    "Adam", "Wanda", "Yusuf", "Greta", "Bruno", "Esther", "Kai", "Miriam",
)  # fmt: skip
LAST_NAMES = (
    "Lopez", "Smith", "Khan", "Wang", "Garcia", "Patel", "Rossi", "Kim", "Nguyen", "Okafor", "Silva", "Brown",
    "Tanaka", "Novak", "Cohen", "Dubois", "Jensen", "Haddad", "Mendes", "Kowalski", "Andersen", "Moreau",
    "Costa", "Fischer", "Yilmaz", "Murphy", "Schmidt", "Sato", "Reyes", "Torres", "Ahmed", "Das", "Lee",
    "Walker", "Young", "Hughes", "Bianchi", "Santos", "Petrov", "Larsen", "Nakamura", "Obi", "Mensah", "Kaur",
    "Singh", "Park", "Choi", "Hoffmann", "Weber", "Turner", "Ward", "Grant", "Ellis", "Romero", "Castillo",
    "Vargas", "Lindqvist", "Osei", "Becker", "Moretti",
)  # fmt: skip
ROLES = (
    "Engineer", "Teacher", "Nurse", "Designer", "Manager", "Volunteer", "Librarian", "Chef", "Pilot", "Doctor",
    "Cashier", "Tour Guide", "Editor", "Analyst", "Architect", "Pharmacist", "Technician", "Receptionist",
    "Photographer", "Musician", "Scientist", "Accountant", "Driver", "Gardener", "Baker", "Mechanic",
    "Electrician", "Translator", "Coach", "Curator",
)  # fmt: skip
BADGE_HEADERS = ("VISITOR", "STAFF", "GUEST", "SPEAKER", "VOLUNTEER", "PRESS", "CREW")
PLATE_LETTERS = "ABCDEFGHJKLMNPRSTUVWXYZ"  # no I, O, Q: plates leave them out as they look like 1 and 0
PLATE_PATTERNS = ("LLL DDDD", "LL DD LLL", "DDD LLL", "LLL-DDD", "L DDD LL", "DLLL DDD")


@dataclass(frozen=True)
class OcrVocab:
    """One split's words."""

    signs: tuple[str, ...]
    streets: tuple[str, ...]
    towns: tuple[str, ...]
    products: tuple[Product, ...]
    stores: tuple[str, ...]
    first_names: tuple[str, ...]
    last_names: tuple[str, ...]
    roles: tuple[str, ...]


def split_vocab(rng: random.Random, heldout_fraction: float = 0.2) -> dict[str, OcrVocab]:
    lists: dict[str, tuple] = {
        "signs": SIGN_PHRASES,
        "streets": STREET_NAMES,
        "towns": TOWNS,
        "products": PRODUCTS,
        "stores": STORE_WORDS,
        "first_names": FIRST_NAMES,
        "last_names": LAST_NAMES,
        "roles": ROLES,
    }
    parts: dict[str, dict[str, tuple]] = {"train": {}, "heldout": {}}
    for name, words in lists.items():
        order = list(words)
        rng.shuffle(order)
        cut = max(1, round(len(order) * heldout_fraction))
        parts["heldout"][name], parts["train"][name] = tuple(order[:cut]), tuple(order[cut:])
    return {split: OcrVocab(**parts[split]) for split in SPLITS}


QA = tuple[str, str, str]  # question, exact short answer, sentence answer


@dataclass(frozen=True)
class OcrContent:
    source: str
    layout: Layout
    qas: tuple[QA, ...]


def money(cents: int) -> str:
    return f"${cents // 100}.{cents % 100:02d}"


def wrap_sign(phrase: str, rng: random.Random) -> list[str]:
    """Long phrases go on two lines, broken where the halves are closest in length."""
    words = phrase.split()
    if len(words) < 2 or (len(phrase) <= 12 and rng.random() < 0.7):
        return [phrase]
    cut = min(range(1, len(words)), key=lambda k: abs(len(" ".join(words[:k])) - len(" ".join(words[k:]))))
    return [" ".join(words[:cut]), " ".join(words[cut:])]


def sign_content(lines: Sequence[str], qas: Sequence[QA], schemes: Sequence[tuple[RGB, RGB]] = SIGN_SCHEMES):
    layout = Layout(
        rows=tuple(Row(line, bold=True) for line in lines),
        families=("sans", "sans-condensed", "serif", "serif-condensed", "mono"),
        schemes=tuple(schemes),
        sizes=(30, 64),
    )
    return OcrContent("ocr-sign", layout, tuple(qas))


def sign_qas(text: str) -> list[QA]:
    return [
        ("What does the sign say?", text, f"The sign says {text}."),
        ("What is written on the sign?", text, f"The sign reads {text}."),
        ("What text is on the sign?", text, f"The sign says {text}."),
        ("What does it say?", text, f"It says {text}."),
    ]


def platform_sign(rng: random.Random, v: OcrVocab) -> OcrContent:
    """A station sign: the platform and where its trains go ("PLATFORM 9" / "Trains to LEEDS")."""
    platform = f"PLATFORM {rng.randint(1, 24)}"
    town = rng.choice(v.towns)
    town = town.title() if rng.random() < 0.5 else town
    lines = [platform, f"Trains to {town}" if town.istitle() else f"TRAINS TO {town}"]
    qas = [
        ("Where do the trains go?", town, f"The trains go to {town}."),
        ("Where does the train from this platform go?", town, f"It goes to {town}."),
        ("Which platform is this?", platform, f"This is {platform}."),
        ("Which platform?", platform, f"{platform}."),
        ("What platform do the trains leave from?", platform, f"They leave from {platform}."),
    ]
    return sign_content(lines, qas, SIGN_SCHEMES[:4])


def random_sign(rng: random.Random, v: OcrVocab) -> OcrContent:
    r = rng.random()
    if r < 0.2:
        name = f"{rng.choice(v.streets)} {rng.choice(STREET_KINDS)}"
        if rng.random() < 0.4:
            name = name.title()
        qas = [
            ("What street is this?", name, f"This is {name}."),
            ("What is the street name on the sign?", name, f"The street name is {name}."),
        ]
        return sign_content([name], qas, SIGN_SCHEMES[:4])
    if r < 0.35:
        template, lo, hi = rng.choice(NUMBERED_SIGNS)
        n = rng.randint(lo, hi) * (10 if template.startswith("SPEED") else 1)
        text = template.format(n=n, l=rng.choice("ABCDEF"))
        return sign_content(wrap_sign(text, rng), sign_qas(text))
    if r < 0.5:
        return platform_sign(rng, v)
    if r < 0.6:
        town, km = rng.choice(v.towns), rng.randint(2, 150)
        lines = [town, f"{km} km"] if rng.random() < 0.6 else [f"{town} {km} km"]
        text = " ".join(lines)
        qas = [
            (f"How far is it to {town.title()}?", f"{km} km", f"It is {km} km to {town.title()}."),
            ("Which town does the sign point to?", town, f"The sign points to {town}."),
        ] + sign_qas(text)
        return sign_content(lines, qas, SIGN_SCHEMES[:4])
    phrase = rng.choice(v.signs)
    return sign_content(wrap_sign(phrase, rng), sign_qas(phrase))


def label_content(product: Product, word: str | None, pack: str | None) -> OcrContent:
    rows = ([Row(word, scale=0.6)] if word else []) + [Row(product.name, bold=True)]
    rows += [Row(pack, scale=0.7)] if pack else []
    full = " ".join(r.text for r in rows)
    qas = [
        ("What is written on the label?", full, f"The label says {full}."),
        ("What does the label say?", full, f"The label says {full}."),
        ("What product is named on the label?", product.name, f"The label is for {product.name}."),
        ("What is this product?", product.name, f"It is {product.name}."),
    ]
    if pack:
        measure_word = "weight" if product.unit == "g" else "volume"
        qas.append((f"What {measure_word} is printed on the label?", pack, f"The label says {pack}."))
        qas.append(("How big is the pack?", pack, f"The pack holds {pack}."))
    layout = Layout(
        rows=tuple(rows),
        families=("serif", "serif-condensed", "sans", "sans-condensed", "serif-italic"),
        schemes=LABEL_SCHEMES,
        sizes=(30, 56),
    )
    return OcrContent("ocr-label", layout, tuple(qas))


def random_label(rng: random.Random, v: OcrVocab) -> OcrContent:
    product = rng.choice(v.products)
    word = rng.choice(LABEL_WORDS) if rng.random() < 0.35 else None
    pack = rng.choice(PACK_SIZES[product.unit]) if rng.random() < 0.6 else None
    return label_content(product, word, pack)


def receipt_content(store: str, items: Sequence[tuple[Product, int]]) -> OcrContent:
    total = money(sum(cents for _, cents in items))
    rows = [Row(store, scale=1.15, bold=True)]
    rows += [Row(p.name, money(cents), align="left") for p, cents in items]
    rows.append(Row("TOTAL", total, bold=True, align="left", rule_above=True))
    qas: list[QA] = [
        ("What is the total on the receipt?", total, f"The total is {total}."),
        ("How much is the total on the receipt?", total, f"The total on the receipt is {total}."),
        ("What is the total?", total, f"The total is {total}."),
        ("How much was spent in total?", total, f"{total} was spent in total."),
        ("What is the name of the store on the receipt?", store, f"The receipt is from {store}."),
        ("Which shop is the receipt from?", store, f"It is from {store}."),
    ]
    for product, cents in items:
        qas.append((product.cost_question(), money(cents), f"{product.costs(money(cents))}."))
        qas.append((product.how_much_question(), money(cents), f"{product.costs(money(cents))}."))
    layout = Layout(
        rows=tuple(rows),
        families=("mono", "sans-condensed", "mono"),  # mono twice: most till receipts are monospaced
        schemes=PAPER_SCHEMES,
        sizes=(20, 24),
        border=False,
    )
    return OcrContent("ocr-receipt", layout, tuple(qas))


def random_receipt(rng: random.Random, v: OcrVocab) -> OcrContent:
    store = f"{rng.choice(v.stores)} {rng.choice(STORE_KINDS)}"
    products = rng.sample(v.products, rng.randint(3, 5))
    return receipt_content(store, [(p, rng.randint(49, 1999)) for p in products])


def price_tag_content(product: Product, cents: int, unit: str | None, sale: bool) -> OcrContent:
    price = money(cents)
    rows = ([Row("SALE", bold=True)] if sale else []) + [Row(product.name, bold=True), Row(price, scale=1.6, bold=True)]
    rows += [Row(unit, scale=0.6)] if unit else []
    per = f" {unit}" if unit else ""
    qas = (
        ("What is the price on the tag?", price, f"The price is {price}{per}."),
        (product.cost_question(), price, f"{product.costs(price)}{per}."),
        (product.how_much_question(), price, f"{product.costs(price)}{per}."),
        ("How much is it?", price, f"It costs {price}{per}."),
        ("What item is the price tag for?", product.name, f"The price tag is for {product.name}."),
    )
    layout = Layout(
        rows=tuple(rows),
        families=("sans", "sans-condensed", "serif", "mono"),
        schemes=TAG_SCHEMES,
        sizes=(24, 40),
        band_rows=int(sale),
        band_schemes=BAND_SCHEMES[:1],
    )
    return OcrContent("ocr-price", layout, qas)


def random_price_tag(rng: random.Random, v: OcrVocab) -> OcrContent:
    unit = rng.choice(PRICE_UNITS) if rng.random() < 0.5 else None
    return price_tag_content(rng.choice(v.products), rng.randint(29, 2999), unit, rng.random() < 0.25)


def badge_content(name: str, header: str | None = None, role: str | None = None) -> OcrContent:
    """A "HELLO my name is" sticker (header HELLO), or a name badge with an optional header band and role."""
    if header == "HELLO":
        rows = [Row("HELLO", scale=1.3, bold=True), Row("my name is", scale=0.6), Row(name, scale=1.4)]
        band_rows = 2
    else:
        rows = ([Row(header, bold=True)] if header else []) + [Row(name, scale=1.1, bold=True)]
        rows += [Row(role, scale=0.75)] if role else []
        band_rows = int(bool(header))
    qas: list[QA] = [
        ("What is the name on the badge?", name, f"The name on the badge is {name}."),
        ("According to the badge, what is this person's name?", name, f"The badge says the name is {name}."),
        ("Whose badge is this?", name, f"It is {name}'s badge."),
    ]
    if role:
        qas.append(("What job title is on the badge?", role, f"The job title on the badge is {role}."))
        qas.append(("What does this person do?", role, f"The badge says {role}."))
    layout = Layout(
        rows=tuple(rows),
        families=("sans", "sans-oblique", "serif", "serif-italic", "sans-condensed"),
        schemes=((WHITE, NEAR_BLACK), ((250, 250, 240), (10, 30, 110))),
        sizes=(24, 36),
        band_rows=band_rows,
        band_schemes=BAND_SCHEMES,
        border=False,
    )
    return OcrContent("ocr-badge", layout, tuple(qas))


def random_badge(rng: random.Random, v: OcrVocab) -> OcrContent:
    first = rng.choice(v.first_names)
    r = rng.random()
    if r < 0.35:
        return badge_content(first, "HELLO")
    name = f"{first} {rng.choice(v.last_names)}"
    if r < 0.7:
        return badge_content(name, role=rng.choice(v.roles))
    return badge_content(name, rng.choice(BADGE_HEADERS), rng.choice(v.roles) if rng.random() < 0.5 else None)


def plate_content(code: str) -> OcrContent:
    qas = (
        ("What is the licence plate number?", code, f"The licence plate number is {code}."),
        ("What is the license plate number?", code, f"The license plate number is {code}."),
        ("What does the number plate say?", code, f"The number plate says {code}."),
        ("What is the registration?", code, f"The registration is {code}."),
    )
    layout = Layout(
        rows=(Row(code, bold=True),),
        families=("mono", "sans-condensed", "sans"),
        schemes=PLATE_SCHEMES,
        sizes=(36, 60),
        min_aspect=3.2,
    )
    return OcrContent("ocr-plate", layout, qas)


def random_plate(rng: random.Random, v: OcrVocab) -> OcrContent:
    pattern = rng.choice(PLATE_PATTERNS)
    code = "".join(
        rng.choice(PLATE_LETTERS) if c == "L" else str(rng.randint(0, 9)) if c == "D" else c for c in pattern
    )
    return plate_content(code)


OCR_KINDS: dict[str, tuple[float, Callable[[random.Random, OcrVocab], OcrContent]]] = {
    "sign": (0.25, random_sign),
    "label": (0.15, random_label),
    "receipt": (0.20, random_receipt),
    "price": (0.15, random_price_tag),
    "badge": (0.13, random_badge),
    "plate": (0.12, random_plate),
}


QUESTIONS_PER_IMAGE = 2


def ocr_conversation(question: str, short: str, sentence: str, rng: random.Random) -> list[dict]:
    """A question as typed; mostly a sentence back, sometimes the text alone (both hold it exactly)."""
    reply = sentence if rng.random() < 0.7 else short
    return [{"from": "human", "value": question}, {"from": "gpt", "value": reply}]


def build_ocr(
    out_dir: Path,
    split: str,
    n: int,
    vocab: OcrVocab,
    rng: random.Random,
    forbidden: set[str],
    taken: set[str],
) -> tuple[list[dict[str, Any]], set[str]]:
    """``n`` images under images/ocr/<split>/ and up to :data:`QUESTIONS_PER_IMAGE` items about
    each. Questions whose answer (case aside) is in ``forbidden`` — the train answers, for
    held-out — are never asked. Returns the items and the pixel digests of their images."""
    folder = out_dir / "images" / "ocr" / split
    folder.mkdir(parents=True, exist_ok=True)
    kinds = sorted(OCR_KINDS)
    weights = [OCR_KINDS[k][0] for k in kinds]
    items, digests = [], set()
    for i in tqdm(range(n), desc=f"ocr {split}", unit="img", disable=None):
        for _ in range(200):
            content = OCR_KINDS[rng.choices(kinds, weights)[0]][1](rng, vocab)
            allowed = [qa for qa in content.qas if qa[1].casefold() not in forbidden]
            if allowed:
                break
        else:
            raise RuntimeError(f"no OCR question with an unseen answer after 200 tries ({split})")
        image, _ = unique_image(lambda layout=content.layout: (render_layout(layout, rng), None), taken)
        name = f"images/ocr/{split}/{i:05d}.png"
        image.save(out_dir / name, format="PNG")
        digests.add(png_digest(image))
        for j, (question, short, sentence) in enumerate(rng.sample(allowed, min(QUESTIONS_PER_IMAGE, len(allowed)))):
            items.append(
                {
                    "id": f"ocr-{split}-{i:05d}-{j}",
                    "image": name,
                    "text": content.layout.text,
                    "conversations": ocr_conversation(question, short, sentence, rng),
                    "short_answer": short,
                    "source": content.source,
                }
            )
    return items, digests


def build(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    """OCR items of both splits; held-out asks no question whose answer is a train answer and
    has no image with the pixels of a train image."""
    vocab = split_vocab(settings.rng("ocr-vocab"))
    out_dir, count = settings.out_dir, settings.counts
    train, train_digests = build_ocr(
        out_dir, "train", count["ocr_train"], vocab["train"], settings.rng("ocr-train"), set(), set()
    )
    train_answers = {item["short_answer"].casefold() for item in train}
    heldout, _ = build_ocr(
        out_dir,
        "heldout",
        count["ocr_heldout"],
        vocab["heldout"],
        settings.rng("ocr-heldout"),
        train_answers,
        train_digests,
    )
    return {"train": train, "heldout": heldout}
