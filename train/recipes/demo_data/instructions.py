"""Text-only instructions and multi-turn chats: sums, counting, spelling, lists, opposites,
definitions, rewriting, facts, small talk, shapes and colours. Every kind is a maker in
``INSTRUCTION_KINDS`` with its share; a piece of content (a sum, a word, a fact) lands in one
split only."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable
from typing import Any

from .common import COLORS, SHAPES, Settings, allocate, join_words

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")  # fmt: skip
ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth")  # fmt: skip
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")  # fmt: skip
LIST_TOPICS: dict[str, tuple[str, ...]] = {
    "colours": ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "gray"),
    "animals": ("dog", "cat", "horse", "cow", "sheep", "goat", "pig", "rabbit", "lion", "tiger", "elephant",
                "giraffe", "zebra", "monkey", "bear", "wolf", "fox", "deer", "kangaroo", "koala", "panda",
                "camel", "dolphin", "whale", "shark", "owl", "eagle", "penguin", "frog", "turtle"),
    "fruits": ("apple", "banana", "orange", "pear", "grape", "cherry", "strawberry", "lemon", "lime", "mango",
               "pineapple", "peach", "plum", "kiwi", "watermelon", "apricot", "raspberry", "blueberry",
               "coconut", "papaya", "fig"),
    "shapes": ("circle", "square", "triangle", "rectangle", "oval", "pentagon", "hexagon", "octagon", "star",
               "heart"),
}  # fmt: skip
WORDS = (
    "apple", "banana", "orange", "grape", "lemon", "cherry", "melon", "peach", "tiger", "zebra", "horse",
    "rabbit", "monkey", "turtle", "dolphin", "eagle", "garden", "window", "pencil", "paper", "school",
    "teacher", "yellow", "purple", "circle", "square", "triangle", "planet", "rocket", "river", "mountain",
    "forest", "island", "bridge", "castle", "kitchen", "bottle", "candle", "ladder", "basket", "button",
    "rainbow", "thunder", "winter", "summer", "autumn", "spring", "friend", "family", "doctor", "market",
    "letter", "number", "music", "guitar", "piano", "camera", "picture", "flower", "butter", "cookie",
    "sugar", "coffee", "jacket", "pocket", "blanket", "pillow", "mirror", "wallet", "ticket", "signal",
    "engine", "anchor", "puzzle", "shadow", "silver", "happy", "quiet", "simple", "travel",
)  # fmt: skip
SENTENCES = (
    "The cat sleeps on the warm mat.", "We walked to the park after lunch.",
    "My brother plays the guitar every evening.", "The red bus stops at the corner.",
    "Birds sing early in the morning.", "She reads a book before bed.", "The train leaves at nine in the morning.",
    "Paris is the capital of France.", "Please close the door quietly.",
    "The children built a sandcastle on the beach.", "Tom and Anna visited the museum.",
    "The blue whale is the largest animal.", "Water boils at one hundred degrees Celsius.",
    "We need milk, eggs and bread.", "The shop opens at eight.", "A triangle has three sides.",
    "The moon shines at night.", "He painted the fence green.", "Our teacher gave us a short test.",
    "The dog chased the ball across the garden.", "I like apples more than oranges.",
    "The library is next to the bank.", "Turn left at the traffic lights.", "The soup is too hot to eat.",
    "Grandma bakes bread on Sundays.", "The river flows into the sea.", "Sam found a coin under the sofa.",
    "The plane landed safely in Rome.", "Every spring the trees grow new leaves.",
    "Mia wrote a letter to her friend.", "The stars look bright tonight.",
    "Please wash your hands before dinner.", "The yellow taxi waited outside the hotel.",
    "Lucy counted ten ducks on the pond.", "The baker sells fresh bread every morning.",
    "Our team won the final match.", "The kitten is hiding under the bed.", "Dad fixed the old bicycle.",
    "Snow covered the quiet village.", "The museum opens on Monday.",
)  # fmt: skip
OPPOSITES = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("left", "right"), ("open", "closed"), ("fast", "slow"),
    ("happy", "sad"), ("day", "night"), ("tall", "short"), ("full", "empty"), ("wet", "dry"), ("hard", "soft"),
    ("early", "late"), ("in", "out"), ("on", "off"), ("yes", "no"), ("high", "low"), ("thick", "thin"),
    ("loud", "quiet"), ("rich", "poor"), ("strong", "weak"), ("clean", "dirty"), ("heavy", "light"),
    ("push", "pull"), ("buy", "sell"), ("win", "lose"), ("always", "never"), ("first", "last"),
    ("inside", "outside"), ("above", "below"), ("before", "after"), ("true", "false"), ("cheap", "expensive"),
    ("easy", "difficult"), ("question", "answer"), ("remember", "forget"), ("start", "finish"),
    ("top", "bottom"), ("front", "back"), ("near", "far"), ("north", "south"), ("east", "west"),
    ("asleep", "awake"), ("maximum", "minimum"), ("increase", "decrease"), ("give", "take"), ("laugh", "cry"),
    ("love", "hate"), ("arrive", "leave"), ("entrance", "exit"), ("young", "old"), ("wide", "narrow"),
)  # fmt: skip
DEFINITIONS = (
    ("a circle", "A circle is a round shape where every point on its edge is the same distance from the centre."),
    ("a triangle", "A triangle is a shape with three straight sides and three corners."),
    ("a square", "A square is a shape with four equal straight sides and four right angles."),
    ("a rectangle", "A rectangle is a shape with four straight sides and four right angles; its opposite sides "
     "are equal in length."),
    ("a pentagon", "A pentagon is a flat shape with five straight sides."),
    ("a hexagon", "A hexagon is a flat shape with six straight sides."),
    ("an octagon", "An octagon is a flat shape with eight straight sides, like a stop sign."),
    ("a noun", "A noun is a word that names a person, place, thing or idea."),
    ("a verb", "A verb is a word that describes an action or a state, such as run or be."),
    ("an adjective", "An adjective is a word that describes a noun, such as red or tall."),
    ("a planet", "A planet is a large body that moves around a star, as the Earth moves around the Sun."),
    ("a mammal", "A mammal is a warm-blooded animal with hair or fur that feeds its young with milk."),
    ("a reptile", "A reptile is a cold-blooded animal with scaly skin, such as a snake, a lizard or a turtle."),
    ("an insect", "An insect is a small animal with six legs and a body in three parts, such as an ant or a bee."),
    ("a thermometer", "A thermometer is a tool that measures temperature."),
    ("a calendar", "A calendar is a chart that shows the days, weeks and months of a year."),
    ("a dictionary", "A dictionary is a book that lists words in alphabetical order and explains their meanings."),
    ("a map", "A map is a drawing of an area that shows where places are."),
    ("a library", "A library is a place where books are kept for people to read or borrow."),
    ("a bridge", "A bridge is a structure that carries a road or path over a river, a road or a valley."),
    ("an island", "An island is a piece of land with water all around it."),
    ("a volcano", "A volcano is an opening in the Earth's surface where melted rock, ash and gas come out."),
    ("a desert", "A desert is a very dry area of land that gets little rain."),
    ("a rainbow", "A rainbow is an arc of colours in the sky, made when sunlight shines through raindrops."),
    ("a receipt", "A receipt is a piece of paper that shows what was bought and how much was paid."),
    ("a price tag", "A price tag is a small label on an item that shows how much it costs."),
    ("the alphabet", "The alphabet is the set of letters used to write a language; English has 26 letters."),
    ("a vowel", "A vowel is one of the letters a, e, i, o and u, and sometimes y."),
    ("a synonym", "A synonym is a word that means the same or nearly the same as another word, like big and large."),
    ("an antonym", "An antonym is a word that means the opposite of another word, like hot and cold."),
    ("an even number", "An even number is a whole number that can be divided by 2 with nothing left over, such as "
     "2, 4 or 6."),
    ("an odd number", "An odd number is a whole number that leaves 1 when divided by 2, such as 1, 3 or 5."),
    ("a sum", "A sum is the result of adding numbers together; the sum of 2 and 3 is 5."),
    ("a product in arithmetic", "A product is the result of multiplying numbers; the product of 3 and 4 is 12."),
    ("a minute", "A minute is a unit of time equal to 60 seconds."),
    ("an hour", "An hour is a unit of time equal to 60 minutes."),
    ("a week", "A week is a period of seven days."),
    ("a kilogram", "A kilogram is a unit of mass equal to 1,000 grams."),
    ("a kilometre", "A kilometre is a unit of length equal to 1,000 metres."),
    ("a litre", "A litre is a unit of volume equal to 1,000 millilitres."),
    ("a shadow", "A shadow is a dark area made when an object blocks light."),
    ("photosynthesis", "Photosynthesis is the process plants use to make food from sunlight, water and carbon "
     "dioxide, giving off oxygen."),
    ("a magnet", "A magnet is an object that pulls iron and steel towards it."),
    ("a telescope", "A telescope is an instrument that makes faraway objects, such as stars and planets, look "
     "closer."),
    ("a sentence", "A sentence is a group of words that expresses a complete thought."),
)  # fmt: skip
FACTS = (
    ("How many days are there in a week?", "There are seven days in a week."),
    ("How many months are there in a year?", "There are twelve months in a year."),
    ("How many hours are there in a day?", "There are 24 hours in a day."),
    ("How many minutes are there in an hour?", "There are 60 minutes in an hour."),
    ("How many seconds are there in a minute?", "There are 60 seconds in a minute."),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("How many letters are there in the English alphabet?", "The English alphabet has 26 letters."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("What is the capital of Germany?", "The capital of Germany is Berlin."),
    ("What is the capital of Italy?", "The capital of Italy is Rome."),
    ("What is the capital of Spain?", "The capital of Spain is Madrid."),
    ("What is the capital of Japan?", "The capital of Japan is Tokyo."),
    ("What is the capital of Egypt?", "The capital of Egypt is Cairo."),
    ("What is the capital of Canada?", "The capital of Canada is Ottawa."),
    ("What is the capital of Australia?", "The capital of Australia is Canberra."),
    ("What is the capital of the United Kingdom?", "The capital of the United Kingdom is London."),
    ("What is the capital of Portugal?", "The capital of Portugal is Lisbon."),
    ("What is the capital of Greece?", "The capital of Greece is Athens."),
    ("What is the capital of Norway?", "The capital of Norway is Oslo."),
    ("What is the capital of Kenya?", "The capital of Kenya is Nairobi."),
    ("What is the capital of Argentina?", "The capital of Argentina is Buenos Aires."),
    ("What is the capital of Ireland?", "The capital of Ireland is Dublin."),
    ("What is the largest planet in our solar system?", "Jupiter is the largest planet in our solar system."),
    ("Which planet is closest to the Sun?", "Mercury is the planet closest to the Sun."),
    ("How many planets are there in our solar system?", "There are eight planets in our solar system."),
    ("What is the star at the centre of our solar system?", "The Sun is the star at the centre of our solar system."),
    ("At what temperature does water freeze at sea level?", "Water freezes at 0 degrees Celsius (32 degrees "
     "Fahrenheit)."),
    ("At what temperature does water boil at sea level?", "Water boils at 100 degrees Celsius (212 degrees "
     "Fahrenheit)."),
    ("What gas do plants take in to make their food?", "Plants take in carbon dioxide to make their food."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("How many legs does an insect have?", "An insect has six legs."),
    ("How many legs does a dog have?", "A dog has four legs."),
    ("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ("What colour is fresh snow?", "Fresh snow is white."),
    ("Which ocean is the largest?", "The Pacific Ocean is the largest ocean."),
    ("What is the largest animal on Earth?", "The blue whale is the largest animal on Earth."),
    ("What do bees make?", "Bees make honey and wax."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many continents are there?", "There are seven continents."),
    ("What is H2O?", "H2O is the chemical formula for water."),
    ("What do caterpillars turn into?", "Caterpillars turn into butterflies or moths."),
    ("Which direction does the Sun rise in?", "The Sun rises in the east."),
)  # fmt: skip
SMALL_TALK = (
    ("Hello!", "Hello! How can I help you today?"),
    ("Hi there.", "Hi! What would you like to know?"),
    ("Good morning!", "Good morning! How can I help you today?"),
    ("Good afternoon.", "Good afternoon! What can I do for you?"),
    ("Good evening.", "Good evening! How can I help?"),
    ("How are you?", "I'm doing well, thank you for asking. How can I help you?"),
    ("Thank you!", "You're welcome! Let me know if you need anything else."),
    ("Thanks for your help.", "You're welcome. I'm glad I could help."),
    ("What can you do?", "I can describe pictures, answer questions about them, read text in images such as signs, "
     "labels and receipts, and help with simple questions like sums, spelling and facts."),
    ("Who are you?", "I am a helpful assistant. I can look at images, read the text in them and answer your "
     "questions."),
    ("Goodbye!", "Goodbye! Have a great day."),
    ("See you later.", "See you later! Take care."),
    ("Can you help me?", "Of course. What do you need help with?"),
    ("Tell me a fun fact.", "An octopus has three hearts."),
    ("Tell me a joke.", "Why did the scarecrow win an award? Because he was outstanding in his field."),
    ("I'm bored.", "You could read a book, go for a walk, draw a picture or learn a new word today."),
    ("Nice to meet you.", "Nice to meet you too! How can I help?"),
    ("Sorry, I made a mistake.", "No problem. Everyone makes mistakes. Shall we try again?"),
    ("Have a nice day!", "Thank you, you too!"),
    ("Good night.", "Good night! Sleep well."),
    ("Are you a robot?", "I am an AI assistant, a computer program rather than a person."),
    ("Can you see images?", "Yes. When you share an image, I can describe it, answer questions about it and read "
     "the text in it."),
    ("Can you read text in pictures?", "Yes. I can read printed text in an image, such as a sign, a label, a price "
     "tag or a receipt."),
    ("Do you speak English?", "Yes, I understand and write English."),
)  # fmt: skip
POLYGON_SIDES = {"triangle": 3, "square": 4, "rectangle": 4, "pentagon": 5, "hexagon": 6, "heptagon": 7, "octagon": 8}
PAINT_MIXES = (
    ("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"), ("red", "white", "pink"),
    ("black", "white", "gray"),
)  # fmt: skip
COLOURED_THINGS = (
    ("a ripe banana", "yellow"), ("a ripe tomato", "red"), ("grass", "green"), ("coal", "black"),
    ("a lemon", "yellow"), ("a carrot", "orange"), ("a lime", "green"), ("milk", "white"),
)  # fmt: skip
PROBLEM_NAMES = ("Tom", "Anna", "Sam", "Mia", "Leo", "Ava", "Ben", "Zoe", "Max", "Ella")
PROBLEM_THINGS = ("apples", "pencils", "stickers", "marbles", "books", "cookies", "cards", "shells", "balloons")

Candidate = tuple[str, dict[str, Any]]  # (content key, item): items with one key are one piece of content


def alpaca(instruction: str, output: str, input_text: str = "") -> dict[str, Any]:
    return {"instruction": instruction, "input": input_text, "output": output}


def chat(*turns: str) -> dict[str, Any]:
    roles = itertools.cycle(("human", "gpt"))
    return {"conversations": [{"from": role, "value": text} for role, text in zip(roles, turns)]}


def sample_unique(make: Callable[[random.Random], Candidate], want: int, rng: random.Random) -> list[Candidate]:
    """Up to ``want`` candidates with distinct keys from a random maker (stops after 20× tries)."""
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(want * 20):
        if len(seen) >= want:
            break
        key, item = make(rng)
        seen.setdefault(key, item)
    return list(seen.items())


def arithmetic(rng: random.Random) -> Candidate:
    op = rng.choice(("add", "sub", "mul", "story-add", "story-sub"))
    if op == "add":
        a, b = rng.randint(0, 60), rng.randint(0, 60)
        q = rng.choice((f"What is {a} + {b}?", f"What is {a} plus {b}?", f"Add {a} and {b}.", f"Calculate {a} + {b}."))
        return f"add:{a}:{b}", alpaca(q, f"{a} + {b} = {a + b}.")
    if op == "sub":
        a = rng.randint(1, 60)
        b = rng.randint(0, a)
        q = rng.choice((f"What is {a} - {b}?", f"What is {a} minus {b}?", f"Subtract {b} from {a}."))
        return f"sub:{a}:{b}", alpaca(q, f"{a} - {b} = {a - b}.")
    if op == "mul":
        a, b = rng.randint(0, 12), rng.randint(0, 12)
        q = rng.choice((f"What is {a} times {b}?", f"Multiply {a} by {b}.", f"What is {a} multiplied by {b}?"))
        return f"mul:{a}:{b}", alpaca(q, f"{a} times {b} is {a * b}.")
    name, things = rng.choice(PROBLEM_NAMES), rng.choice(PROBLEM_THINGS)
    if op == "story-add":
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        q = f"{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?"
        return f"story-add:{a}:{b}:{things}", alpaca(
            q, f"{name} has {a + b} {things} now, because {a} + {b} = {a + b}."
        )
    a = rng.randint(4, 30)
    b = rng.randint(1, a - 2)  # at least 2 left, so the answer stays plural
    q = f"{name} has {a} {things} and gives away {b}. How many {things} are left?"
    return f"story-sub:{a}:{b}:{things}", alpaca(q, f"{a - b} {things} are left, because {a} - {b} = {a - b}.")


def counting(rng: random.Random) -> Candidate:
    kind = rng.choice(("up", "down", "letters", "words", "vowels", "items"))
    if kind in ("up", "down"):
        a = rng.randint(0, 30)
        b = a + rng.randint(3, 9)
        numbers = list(range(a, b + 1))
        if kind == "down":
            return f"down:{a}:{b}", alpaca(f"Count down from {b} to {a}.", ", ".join(map(str, numbers[::-1])) + ".")
        return f"up:{a}:{b}", alpaca(f"Count from {a} to {b}.", ", ".join(map(str, numbers)) + ".")
    if kind == "letters":
        w = rng.choice(WORDS)
        return f"letters:{w}", alpaca(
            f'How many letters are in the word "{w}"?', f'The word "{w}" has {len(w)} letters.'
        )
    if kind == "vowels":
        w = rng.choice(WORDS)
        n = sum(c in "aeiou" for c in w)
        noun = "vowel" if n == 1 else "vowels"
        return f"vowels:{w}", alpaca(
            f'How many vowels (a, e, i, o, u) are in the word "{w}"?', f'The word "{w}" has {n} {noun}.'
        )
    if kind == "words":
        s = rng.choice(SENTENCES)
        return f"words:{s}", alpaca("How many words are in this sentence?", f"It has {len(s.split())} words.", s)
    topic = rng.choice(sorted(LIST_TOPICS))
    chosen = rng.sample(LIST_TOPICS[topic], rng.randint(2, 7))
    return f"items:{','.join(chosen)}", alpaca(
        "How many items are in this list?", f"There are {len(chosen)} items.", ", ".join(chosen)
    )


def spelling(rng: random.Random) -> Candidate:
    kind = rng.choice(("spell", "first", "last", "reverse", "after", "before", "sort"))
    w = rng.choice(WORDS)
    if kind == "spell":
        return f"spell:{w}", alpaca(f'Spell the word "{w}".', f'"{w}" is spelled {"-".join(w.upper())}.')
    if kind == "first":
        return f"first:{w}", alpaca(
            f'What is the first letter of "{w}"?', f'The first letter of "{w}" is {w[0].upper()}.'
        )
    if kind == "last":
        return f"last:{w}", alpaca(
            f'What is the last letter of "{w}"?', f'The last letter of "{w}" is {w[-1].upper()}.'
        )
    if kind == "reverse":
        return f"reverse:{w}", alpaca(f'Write the word "{w}" backwards.', w[::-1])
    if kind in ("after", "before"):
        i = rng.randint(0, 24) + (kind == "before")
        letter = chr(ord("A") + i)
        other = chr(ord(letter) + (1 if kind == "after" else -1))
        return f"{kind}:{letter}", alpaca(
            f"What letter comes {kind} {letter} in the alphabet?", f"{other} comes {kind} {letter} in the alphabet."
        )
    chosen = rng.sample(WORDS, rng.randint(3, 5))
    return f"sort:{','.join(sorted(chosen))}", alpaca(
        "Put these words in alphabetical order.", ", ".join(sorted(chosen)), ", ".join(chosen)
    )


def listing(rng: random.Random) -> Candidate:
    kind = rng.choice(("topic", "topic", "days", "months", "day-next", "month-next", "month-nth"))
    if kind == "topic":
        topic = rng.choice(sorted(LIST_TOPICS))
        n = rng.randint(2, 5)
        chosen = rng.sample(LIST_TOPICS[topic], n)
        verb = rng.choice(("List", "Name"))
        answer = join_words(chosen)
        return f"topic:{','.join(sorted(chosen))}", alpaca(
            f"{verb} {NUMBER_WORDS[n]} {topic}.", answer[0].upper() + answer[1:] + "."
        )
    if kind == "days":
        return "days", alpaca("List the days of the week.", join_words(DAYS) + ".")
    if kind == "months":
        return "months", alpaca("List the months of the year.", join_words(MONTHS) + ".")
    if kind == "day-next":
        i = rng.randrange(7)
        if rng.random() < 0.5:
            return f"day-after:{i}", alpaca(
                f"What day comes after {DAYS[i]}?", f"{DAYS[(i + 1) % 7]} comes after {DAYS[i]}."
            )
        return f"day-before:{i}", alpaca(f"What day comes before {DAYS[i]}?", f"{DAYS[i - 1]} comes before {DAYS[i]}.")
    i = rng.randrange(12)
    if kind == "month-nth":
        return f"month-nth:{i}", alpaca(
            f"What is the {ORDINALS[i]} month of the year?", f"The {ORDINALS[i]} month of the year is {MONTHS[i]}."
        )
    if rng.random() < 0.5:
        return f"month-after:{i}", alpaca(
            f"Which month comes after {MONTHS[i]}?", f"{MONTHS[(i + 1) % 12]} comes after {MONTHS[i]}."
        )
    return f"month-before:{i}", alpaca(
        f"Which month comes before {MONTHS[i]}?", f"{MONTHS[i - 1]} comes before {MONTHS[i]}."
    )


def opposites(rng: random.Random) -> list[Candidate]:
    out = []
    for a, b in OPPOSITES:
        word, other = (a, b) if rng.random() < 0.5 else (b, a)
        q = rng.choice((f'What is the opposite of "{word}"?', f'Give the opposite of the word "{word}".'))
        out.append((f"opposite:{a}:{b}", alpaca(q, f'The opposite of "{word}" is "{other}".')))
    return out


def definitions(rng: random.Random) -> list[Candidate]:
    out = []
    for term, text in DEFINITIONS:
        q = rng.choice((f"What is {term}?", f"Explain in one sentence what {term} is.", f"Define {term}."))
        out.append((f"define:{term}", alpaca(q, text)))
    return out


def rewriting(rng: random.Random) -> list[Candidate]:
    out = []
    for s in SENTENCES:
        out.append((f"upper:{s}", alpaca("Rewrite this sentence in capital letters.", s.upper(), s)))
        out.append((f"lower:{s}", alpaca("Rewrite this sentence in lowercase letters.", s.lower(), s.upper())))
        out.append((f"title:{s}", alpaca("Capitalise the first letter of every word.", s.title(), s.lower())))
    return out


def facts(rng: random.Random) -> list[Candidate]:
    return [(f"fact:{q}", alpaca(q, a)) for q, a in FACTS]


def small_talk(rng: random.Random) -> list[Candidate]:
    return [(f"talk:{q}", alpaca(q, a)) for q, a in SMALL_TALK]


def shapes_and_colours(rng: random.Random) -> list[Candidate]:
    qas: list[tuple[str, str, str]] = []  # (key, question, answer)
    for shape, n in POLYGON_SIDES.items():
        qas.append((f"sides:{shape}", f"How many sides does a {shape} have?", f"A {shape} has {n} sides."))
        qas.append((f"corners:{shape}", f"How many corners does a {shape} have?", f"A {shape} has {n} corners."))
        qas.append((f"round:{shape}", f"Is a {shape} round?", f"No, a {shape} has straight sides and corners."))
    qas.append(("round:circle", "Is a circle round?", "Yes, a circle is round."))
    qas.append(
        ("sides:circle", "How many straight sides does a circle have?", "None: the edge of a circle is one curve.")
    )
    for n, name in ((3, "triangle"), (5, "pentagon"), (6, "hexagon"), (8, "octagon")):
        qas.append((f"named:{n}", f"What is a flat shape with {NUMBER_WORDS[n]} straight sides called?", f"A {name}."))
    polygons = sorted(POLYGON_SIDES.items(), key=lambda kv: (kv[1], kv[0]))
    for (a, na), (b, nb) in itertools.combinations(polygons, 2):
        if na != nb:
            first, second = (a, b) if rng.random() < 0.5 else (b, a)
            answer = f"A {b if nb > na else a} has more sides: a {a} has {na} and a {b} has {nb}."
            qas.append((f"more:{a}:{b}", f"Which has more sides, a {first} or a {second}?", answer))
    for a, b, mix in PAINT_MIXES:
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        qas.append((f"mix:{a}:{b}", f"What colour do you get when you mix {first} and {second} paint?", f"{mix}."))
    for thing, colour in COLOURED_THINGS:
        qas.append((f"colour-of:{thing}", f"What colour is {thing}?", f"{thing[0].upper() + thing[1:]} is {colour}."))
    for word in list(COLORS) + list(SHAPES):
        kind = "colour" if word in COLORS else "shape"
        qas.append((f"kind:{word}", f'Is "{word}" a colour or a shape?', f'"{word.capitalize()}" is a {kind}.'))
    qas.append(
        (
            "square-vs-rectangle",
            "What is the difference between a square and a rectangle?",
            "Both have four straight sides and four right angles, but all four sides of a square are the same "
            "length, while a rectangle's length and width can differ.",
        )
    )
    return [(key, alpaca(question, answer[0].upper() + answer[1:])) for key, question, answer in qas]


def multi_turn(rng: random.Random) -> Candidate:
    kind = rng.choice(("sum", "spell", "greet", "days", "case"))
    if kind == "sum":
        a, b, c = rng.randint(1, 30), rng.randint(1, 30), rng.randint(1, 20)
        return f"chat-sum:{a}:{b}:{c}", chat(
            f"What is {a} + {b}?", f"{a} + {b} = {a + b}.", f"Now add {c} to that.", f"{a + b} + {c} = {a + b + c}."
        )
    if kind == "spell":
        w = rng.choice(WORDS)
        return f"chat-spell:{w}", chat(
            f'Spell "{w}".', "-".join(w.upper()) + ".", "How many letters is that?", f'"{w}" has {len(w)} letters.'
        )
    if kind == "greet":
        (hello, reply), (question, answer) = rng.choice(SMALL_TALK[:5]), rng.choice(FACTS)
        return f"chat-greet:{hello}:{question}", chat(hello, reply, question, answer)
    if kind == "days":
        i = rng.randrange(7)
        return f"chat-days:{i}", chat(
            f"What day comes after {DAYS[i]}?",
            f"{DAYS[(i + 1) % 7]}.",
            "And the day after that?",
            f"{DAYS[(i + 2) % 7]}.",
        )
    w = rng.choice(WORDS)
    return f"chat-case:{w}", chat(f'Write "{w}" in capital letters.', w.upper(), "Now in lowercase.", w)


INSTRUCTION_KINDS: dict[str, tuple[float, Callable[..., Any], bool]] = {
    # name: (share, maker, whether the maker draws one random candidate per call)
    "arithmetic": (0.18, arithmetic, True),
    "counting": (0.10, counting, True),
    "spelling": (0.10, spelling, True),
    "listing": (0.10, listing, True),
    "opposites": (0.07, opposites, False),
    "definitions": (0.07, definitions, False),
    "rewriting": (0.08, rewriting, False),
    "facts": (0.08, facts, False),
    "small-talk": (0.04, small_talk, False),
    "shapes-colours": (0.08, shapes_and_colours, False),
    "multi-turn": (0.10, multi_turn, True),
}


def signature(item: dict[str, Any]) -> str:
    """What makes two instruction items the same prompt (case and spacing aside)."""
    if "conversations" in item:
        text = "\n".join(turn["value"] for turn in item["conversations"] if turn["from"] == "human")
    else:
        text = f"{item['instruction']}\n{item['input']}"
    return " ".join(text.lower().split())


def build_instructions(n_train: int, n_heldout: int, rng: random.Random) -> dict[str, list[dict[str, Any]]]:
    """Candidates from every kind, one per content key and prompt; each kind's share is split
    between the splits, so a piece of content (a sum, a word, a fact) is in one split only."""
    total = n_train + n_heldout
    pools: dict[str, list[Candidate]] = {}
    seen: set[str] = set()
    for kind, (share, maker, random_maker) in INSTRUCTION_KINDS.items():
        candidates = sample_unique(maker, 2 * math.ceil(share * total) + 4, rng) if random_maker else maker(rng)
        pools[kind] = []
        for key, item in candidates:
            if signature(item) not in seen:
                seen.add(signature(item))
                pools[kind].append((key, {**item, "source": f"text-{kind}"}))
        rng.shuffle(pools[kind])
    quota = allocate(total, {k: v[0] for k, v in INSTRUCTION_KINDS.items()}, {k: len(v) for k, v in pools.items()})
    held_quota = allocate(n_heldout, dict(quota), quota)  # each kind's own share of held-out
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "heldout": []}
    for kind, pool in pools.items():
        splits["heldout"] += [item for _, item in pool[: held_quota[kind]]]
        splits["train"] += [item for _, item in pool[held_quota[kind] : quota[kind]]]
    for split, items in splits.items():
        rng.shuffle(items)
        splits[split] = [{"id": f"text-{split}-{i:05d}", **item} for i, item in enumerate(items)]
    return splits


def build(settings: Settings) -> dict[str, list[dict[str, Any]]]:
    count = settings.counts
    return build_instructions(count["instructions_train"], count["instructions_heldout"], settings.rng("instructions"))
