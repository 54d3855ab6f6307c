"""Writer of the bundled general-English text and of the general-knowledge QA probe.

Every sentence comes from a template written for minift, filled from small tables of common
knowledge (capitals, colours, animals, numbers, calendar) or of invented things (towns, people,
recipes' quantities), with ``random.Random`` choosing the phrasing. The QA probe is built from
the same tables, so each question asks about a fact the corpus states several times: after
pretraining the tiny model has a chance to know it, and after fine-tuning we can see whether it
still does (catastrophic forgetting, lecture 000).

Only ``make_bundled`` calls this module; ``paragraph(rng, pool)`` is its main entry.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import partial

# ---- number words --------------------------------------------------------------------------

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
         "fifteen sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    """English words for 0 <= n <= 100 ("forty-two")."""
    if n == 100:
        return "one hundred"
    if n < 20:
        return _ONES[n]
    tens, ones = divmod(n, 10)
    return _TENS[tens] + (f"-{_ONES[ones]}" if ones else "")


def cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def article(word: str) -> str:
    """"a" or "an" before ``word`` (by its sound: "an hour", "an owlet")."""
    return "an" if word[0] in "aeiou" or word.startswith("hour") else "a"


def amount(n: int) -> str:
    return "one thousand" if n == 1000 else words(n)


def join_list(items) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


# ---- fact tables: common knowledge ------------------------------------------------------------

# (country, capital, continent, language or None)
COUNTRIES = [
    ("France", "Paris", "Europe", "French"), ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"), ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"), ("Greece", "Athens", "Europe", "Greek"),
    ("Ireland", "Dublin", "Europe", None), ("Norway", "Oslo", "Europe", "Norwegian"),
    ("Sweden", "Stockholm", "Europe", "Swedish"), ("Finland", "Helsinki", "Europe", None),
    ("Denmark", "Copenhagen", "Europe", "Danish"), ("Poland", "Warsaw", "Europe", "Polish"),
    ("Austria", "Vienna", "Europe", "German"), ("Hungary", "Budapest", "Europe", "Hungarian"),
    ("Iceland", "Reykjavik", "Europe", "Icelandic"), ("the United Kingdom", "London", "Europe", "English"),
    ("Russia", "Moscow", "Europe and Asia", "Russian"), ("Japan", "Tokyo", "Asia", "Japanese"),
    ("China", "Beijing", "Asia", None), ("India", "New Delhi", "Asia", None),
    ("South Korea", "Seoul", "Asia", "Korean"), ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"), ("Turkey", "Ankara", "Europe and Asia", "Turkish"),
    ("Egypt", "Cairo", "Africa", "Arabic"), ("Kenya", "Nairobi", "Africa", None),
    ("Ghana", "Accra", "Africa", None), ("Morocco", "Rabat", "Africa", None),
    ("Canada", "Ottawa", "North America", None), ("Cuba", "Havana", "North America", "Spanish"),
    ("Brazil", "Brasilia", "South America", "Portuguese"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"),
    ("Peru", "Lima", "South America", "Spanish"), ("Chile", "Santiago", "South America", "Spanish"),
    ("Australia", "Canberra", "Oceania", "English"),
]

# (thing, colour) - plain colours of everyday things
COLOURS = [
    ("the sky on a clear day", "blue"), ("fresh grass", "green"), ("a ripe banana", "yellow"),
    ("fresh snow", "white"), ("coal", "black"), ("a ripe tomato", "red"), ("a carrot", "orange"),
    ("a lemon", "yellow"), ("milk", "white"), ("a lime", "green"), ("a strawberry", "red"),
    ("a crow", "black"), ("chocolate", "brown"), ("an aubergine", "purple"),
]
COLOUR_QUESTIONS = {  # thing in the question -> thing as the corpus names it
    "snow": "fresh snow", "grass": "fresh grass", "the sky on a clear day": "the sky on a clear day",
    "a ripe banana": "a ripe banana", "coal": "coal", "a ripe tomato": "a ripe tomato",
    "a carrot": "a carrot",
}
MIXES = [("blue", "yellow", "green"), ("red", "yellow", "orange"), ("red", "blue", "purple"),
         ("red", "white", "pink"), ("black", "white", "grey")]
RAINBOW = ["red", "orange", "yellow", "green", "blue", "indigo", "violet"]

# animal: young, sound, legs, home (None where there is no simple answer)
ANIMALS = {
    "cat": ("kitten", "meow", 4, None), "dog": ("puppy", "bark", 4, "kennel"),
    "cow": ("calf", "moo", 4, "barn"), "sheep": ("lamb", "baa", 4, None),
    "horse": ("foal", "neigh", 4, "stable"), "duck": ("duckling", "quack", 2, None),
    "frog": ("tadpole", "croak", 4, "pond"), "bear": ("cub", None, 4, "den"),
    "hen": ("chick", "cluck", 2, "coop"), "pig": ("piglet", "oink", 4, "sty"),
    "owl": ("owlet", "hoot", 2, None), "lion": ("cub", "roar", 4, None),
    "bee": (None, "buzz", 6, "hive"), "spider": (None, None, 8, "web"),
    "rabbit": ("kit", None, 4, "burrow"), "bird": ("chick", "chirp", 2, "nest"),
}
ANIMAL_FACTS = [
    "A spider has eight legs.", "An insect has six legs.", "A bird has two legs and two wings.",
    "Bees make honey from the nectar of flowers.", "Cows give us milk.", "Hens lay eggs.",
    "Fish breathe through gills.", "A whale is a mammal, not a fish.", "A bat is a mammal that can fly.",
    "Penguins cannot fly, but they are excellent swimmers.", "The giraffe is the tallest animal on land.",
    "The cheetah is the fastest animal on land.", "The blue whale is the largest animal that has ever lived.",
    "A caterpillar turns into a butterfly.", "A tadpole grows into a frog.", "An octopus has eight arms.",
    "Frogs are amphibians, so they live both in water and on land.",
    "Camels can walk for days in the desert without drinking.", "Owls hunt at night.",
    "Squirrels bury nuts so they have food in winter.", "Snakes have no legs.",
]

PLANETS = ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn", "Uranus", "Neptune"]
SPACE_FACTS = [
    "The Sun is a star.", "The Earth goes around the Sun once a year.", "The Moon goes around the Earth.",
    "The Earth spins once every day.", "There are eight planets in our solar system.",
    "Mercury is the planet closest to the Sun.", "Jupiter is the largest planet.",
    "Mars is called the red planet.", "Saturn is famous for its rings.",
    "The Earth is the third planet from the Sun.", "The Sun rises in the east and sets in the west.",
    "At night we can see stars because the bright Sun is on the other side of the Earth.",
]
SCIENCE_FACTS = [
    "Water boils at one hundred degrees Celsius at sea level.", "Water freezes at zero degrees Celsius.",
    "Ice floats on water.", "Plants need sunlight, water and air to grow.",
    "Plants take in carbon dioxide and give off oxygen.", "People breathe in oxygen.",
    "The heart pumps blood around the body.", "An adult human has two hundred and six bones.",
    "Light travels much faster than sound.", "A magnet pulls on iron.", "Metals carry electricity well.",
    "Rubber and wood do not carry electricity well.", "Warm air rises.",
]
SHAPES = [("triangle", 3), ("square", 4), ("rectangle", 4), ("pentagon", 5), ("hexagon", 6), ("octagon", 8)]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth",
            "tenth", "eleventh", "twelfth"]
UNITS = [  # (bigger, count, smaller)
    ("week", 7, "days"), ("year", 12, "months"), ("day", 24, "hours"), ("hour", 60, "minutes"),
    ("minute", 60, "seconds"), ("metre", 100, "centimetres"), ("kilometre", 1000, "metres"),
    ("kilogram", 1000, "grams"), ("dozen", 12, "things"), ("decade", 10, "years"), ("century", 100, "years"),
]
OPPOSITES = [("hot", "cold"), ("big", "small"), ("up", "down"), ("day", "night"), ("wet", "dry"),
             ("fast", "slow"), ("open", "closed"), ("happy", "sad"), ("light", "dark"), ("full", "empty"),
             ("old", "new"), ("loud", "quiet")]
JOBS = [  # (job, what they do)
    ("baker", "bakes bread and cakes"), ("farmer", "grows crops and looks after animals"),
    ("doctor", "helps sick people get better"), ("teacher", "helps children learn"),
    ("pilot", "flies aeroplanes"), ("firefighter", "puts out fires"), ("dentist", "looks after teeth"),
    ("librarian", "looks after the books in a library"), ("carpenter", "makes things out of wood"),
    ("chef", "cooks meals in a kitchen"), ("letter carrier", "delivers letters and parcels"),
    ("gardener", "looks after plants and flowers"), ("fisher", "catches fish"),
    ("vet", "looks after sick animals"),
]
GEOGRAPHY = [
    "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South "
    "America.",
    "Asia is the largest continent.", "Antarctica is the coldest continent.",
    "The Pacific Ocean is the largest ocean.", "Mount Everest is the highest mountain on Earth.",
    "The Sahara is a huge hot desert in the north of Africa.",
    "The equator is an imaginary line around the middle of the Earth.",
    "Places near the equator are warm all year.", "Places near the poles are cold for most of the year.",
    "Most rivers flow downhill until they reach a lake or the sea.",
    "An island is land with water all around it.", "A peninsula is land with water on three sides.",
    "Sea water is salty, but the water in most rivers and lakes is fresh.",
]


# ---- phrasing helpers -----------------------------------------------------------------------


def capital_sentence(rng: random.Random, country: str, capital: str) -> str:
    c = cap(country)
    return rng.choice([
        f"The capital of {country} is {capital}.", f"{capital} is the capital of {country}.",
        f"The capital city of {country} is {capital}.",
        f"{c} has its capital in {capital}, where the national government sits.",
        f"If someone asks you for the capital of {country}, the answer is {capital}.",
    ])


def continent_sentence(rng: random.Random, country: str, continent: str) -> str:
    c = cap(country)
    return rng.choice([f"{c} is a country in {continent}.", f"{c} lies in {continent}.",
                       f"On a map, you will find {country} in {continent}."])


def language_sentence(rng: random.Random, country: str, language: str) -> str:
    return rng.choice([f"Most people in {country} speak {language}.",
                       f"The main language of {country} is {language}.",
                       f"In {country}, you will hear {language} spoken in shops and schools."])


def colour_sentence(rng: random.Random, thing: str, colour: str) -> str:
    return rng.choice([f"{cap(thing)} is {colour}.", f"The colour of {thing} is {colour}.",
                       f"If you look at {thing}, you will see that it is {colour}."])


def sum_sentence(rng: random.Random, a: int, b: int) -> str:
    c = a + b
    return rng.choice([f"{cap(words(a))} plus {words(b)} is {words(c)}.", f"{a} + {b} = {c}.",
                       f"If you add {words(a)} and {words(b)}, you get {words(c)}.",
                       f"{cap(words(a))} and {words(b)} make {words(c)}, or {a} + {b} = {c}."])


def difference_sentence(rng: random.Random, a: int, b: int) -> str:
    c = a - b
    verb = "is" if c == 1 else "are"
    return rng.choice([f"{cap(words(a))} minus {words(b)} is {words(c)}.", f"{a} - {b} = {c}.",
                       f"If you take {words(b)} away from {words(a)}, {words(c)} {verb} left."])


def product_sentence(rng: random.Random, a: int, b: int) -> str:
    c = a * b
    return rng.choice([f"{cap(words(a))} times {words(b)} is {words(c)}.", f"{a} x {b} = {c}.",
                       f"{cap(words(a))} groups of {words(b)} make {words(c)}."])


# ---- paragraph writers: facts --------------------------------------------------------------

CAPITAL_FILLERS = [
    "A capital is the city where a country's government usually meets.",
    "Capitals often have large museums, old buildings and busy railway stations.",
    "Many people move to a capital to study or to find work.",
    "Visitors like to walk around a capital and look at its squares and parks.",
    "Maps often mark a capital with a star or a small circle.",
]


def country_paragraph(rng: random.Random) -> str:
    sentences = []
    for country, capital, continent, language in rng.sample(COUNTRIES, rng.randint(2, 4)):
        sentences.append(continent_sentence(rng, country, continent))
        sentences.append(capital_sentence(rng, country, capital))
        if language and rng.random() < 0.6:
            sentences.append(language_sentence(rng, country, language))
    if rng.random() < 0.5:
        sentences.insert(rng.randrange(len(sentences) + 1), rng.choice(CAPITAL_FILLERS))
    return " ".join(sentences)


def colour_paragraph(rng: random.Random) -> str:
    facts = [colour_sentence(rng, t, c) for t, c in rng.sample(COLOURS, rng.randint(3, 5))]
    a, b, mixed = rng.choice(MIXES)
    facts.append(rng.choice([f"When you mix {a} paint and {b} paint, you get {mixed}.",
                             f"Mixing {a} and {b} gives {mixed}.",
                             f"{cap(a)} and {b} together make {mixed}."]))
    if rng.random() < 0.4:
        facts.append(f"A rainbow has seven colours: {join_list(RAINBOW)}.")
    rng.shuffle(facts)
    return " ".join(facts)


def animal_sentences(rng: random.Random, animal: str) -> list[str]:
    young, sound, legs, home = ANIMALS[animal]
    a = cap(article(animal))
    out = []
    if young:
        y = f"{article(young)} {young}"
        out.append(rng.choice([f"A baby {animal} is called {y}.", f"{a} young {animal} is {y}.",
                               f"The young of the {animal} is called {y}."]))
    if sound:
        out.append(rng.choice([f"{a} {animal} says {sound}.", f"{a} {animal} goes {sound}.",
                               f"You can hear {a.lower()} {animal} say {sound}."]))
    if legs == 2:
        out.append(f"{a} {animal} has two legs and two wings.")
    else:
        n = words(legs)
        out.append(rng.choice([f"{a} {animal} has {n} legs.", f"{a} {animal} walks on {n} legs."]))
    if home:
        out.append(rng.choice([f"{a} {animal} lives in a {home}.",
                               f"The home of {a.lower()} {animal} is a {home}."]))
    return out


def animal_paragraph(rng: random.Random) -> str:
    sentences = []
    for animal in rng.sample(sorted(ANIMALS), rng.randint(1, 3)):
        sentences += animal_sentences(rng, animal)
    sentences += rng.sample(ANIMAL_FACTS, rng.randint(1, 3))
    return " ".join(sentences)


def number_paragraph(rng: random.Random, pool: Pool) -> str:
    sentences = [rng.choice(["Here are some sums.", "Numbers are useful every day.",
                             "Counting and adding are the first steps in arithmetic.",
                             "Let us practise some simple arithmetic."])]
    for _ in range(rng.randint(3, 6)):
        kind = rng.random()
        if kind < 0.45:
            sentences.append(sum_sentence(rng, rng.randint(1, 10), rng.randint(1, 10)))
        elif kind < 0.7:
            a = rng.randint(2, 20)
            sentences.append(difference_sentence(rng, a, rng.randint(1, a - 1)))
        else:
            sentences.append(product_sentence(rng, rng.randint(2, 10), rng.randint(2, 10)))
    if rng.random() < 0.5:
        n = rng.randint(1, 20)
        sentences.append(f"{cap(words(n))} is an {'even' if n % 2 == 0 else 'odd'} number.")
    if rng.random() < 0.5:
        sentences.append(word_problem(rng, pool))
    return " ".join(sentences)


def word_problem(rng: random.Random, pool: Pool) -> str:
    name, _ = rng.choice(pool.people)
    thing = rng.choice(["apples", "marbles", "stickers", "shells", "pencils", "eggs", "books", "coins"])
    a, b = rng.randint(3, 12), rng.randint(1, 9)
    if rng.random() < 0.5:
        return (f"{name} had {words(a)} {thing} and was given {words(b)} more, "
                f"so now {name} has {words(a + b)} {thing}.")
    a = a + b
    return f"{name} had {words(a)} {thing} and gave away {words(b)}, so {words(a - b)} were left."


def calendar_paragraph(rng: random.Random) -> str:
    i, m = rng.randrange(7), rng.randrange(12)
    day, nxt, prev = DAYS[i], DAYS[(i + 1) % 7], DAYS[i - 1]
    sentences = [
        rng.choice([f"There are seven days in a week: {join_list(DAYS)}.", "A week has seven days.",
                    "A week is seven days long."]),
        rng.choice([f"The day after {day} is {nxt}.", f"{nxt} comes after {day}.",
                    f"The day before {day} is {prev}."]),
        rng.choice([f"{MONTHS[m]} is the {ORDINALS[m]} month of the year.",
                    f"The {ORDINALS[m]} month of the year is {MONTHS[m]}."]),
        rng.choice(["There are twelve months in a year.", "A year has twelve months.",
                    "A year usually has 365 days, and a leap year has 366.",
                    "February is the shortest month.", "January is the first month and December is the last.",
                    "The four seasons are spring, summer, autumn and winter."]),
    ]
    sentences.append(unit_sentence(rng, *rng.choice(UNITS)))
    rng.shuffle(sentences)
    return " ".join(dict.fromkeys(sentences))  # two slots can pick the same fact


def unit_sentence(rng: random.Random, big: str, count: int, small: str) -> str:
    if big == "dozen":
        return rng.choice(["A dozen is twelve.", "A dozen eggs means twelve eggs."])
    return rng.choice([f"There are {amount(count)} {small} in {article(big)} {big}.",
                       f"{cap(article(big))} {big} has {amount(count)} {small}."])


def shape_paragraph(rng: random.Random) -> str:
    sentences = []
    for shape, sides in rng.sample(SHAPES, rng.randint(2, 4)):
        a = article(shape)
        sentences.append(rng.choice([f"{cap(a)} {shape} has {words(sides)} sides.",
                                     f"{cap(a)} {shape} is a shape with {words(sides)} straight sides.",
                                     f"Count the sides of {a} {shape} and you will find {words(sides)}."]))
    sentences.append(rng.choice(["A circle has no corners.",
                                 "A circle is perfectly round and has no corners.",
                                 "A square has four equal sides and four corners.",
                                 "A cube has six faces, and each face is a square."]))
    rng.shuffle(sentences)
    return " ".join(sentences)


def word_paragraph(rng: random.Random) -> str:
    sentences = []
    for pair in rng.sample(OPPOSITES, rng.randint(2, 4)):
        a, b = pair if rng.random() < 0.5 else pair[::-1]
        sentences.append(rng.choice([f"The opposite of {a} is {b}.", f"{cap(a)} is the opposite of {b}.",
                                     f"{cap(a)} and {b} are opposites."]))
    for job, does in rng.sample(JOBS, rng.randint(1, 3)):
        sentences.append(rng.choice([f"A {job} {does}.",
                                     f"The job of a {job} is simple to describe: a {job} {does}.",
                                     f"Someone who {does} is called a {job}."]))
    rng.shuffle(sentences)
    return " ".join(sentences)


def world_paragraph(rng: random.Random) -> str:
    pool = SPACE_FACTS + SCIENCE_FACTS + GEOGRAPHY
    sentences = rng.sample(pool, rng.randint(3, 5))
    if rng.random() < 0.4:
        p = rng.randrange(8)
        order = f"In order from the Sun, the planets are {join_list(PLANETS)}."
        number = f"{PLANETS[p]} is planet number {words(p + 1)} from the Sun."
        sentences.append(order if rng.random() < 0.5 else number)
    return " ".join(sentences)


# ---- paragraph writers: explanations ----------------------------------------------------------

# Each topic is a list of sentence slots; each slot lists interchangeable phrasings.
EXPLAINERS = {
    "water cycle": [
        ["The water on Earth moves in a never-ending circle.", "Water travels around our planet in a loop."],
        ["The Sun warms lakes and seas, and some of the water turns into invisible vapour.",
         "When the Sun heats the sea, a little water rises into the air as vapour."],
        ["High in the sky the vapour cools and gathers into tiny drops, and the drops form clouds.",
         "Up where the air is cold, the vapour turns back into droplets that crowd together as clouds."],
        ["When the drops grow heavy, they fall as rain or snow.",
         "Heavy drops fall back down as rain, or as snow in winter."],
        ["Rivers carry the water back to the sea, and the circle starts again.",
         "Streams and rivers bring it home to the sea, ready for the next trip."],
    ],
    "sky": [
        ["Sunlight looks white, but it is a mix of all colours.",
         "The light of the Sun is made of many colours mixed together."],
        ["When it passes through the air, blue light bounces around more than red light.",
         "Air scatters blue light much more strongly than red light."],
        ["That scattered blue light reaches our eyes from every part of the sky, so the sky looks blue.",
         "Because blue light comes at us from all directions, a clear sky looks blue."],
        ["At sunset the light crosses much more air, and the sky turns orange and red.",
         "In the evening the sunlight travels a longer path through the air, so the sky glows orange."],
    ],
    "day and night": [
        ["The Earth spins like a top, turning once every day.", "Our planet turns around once a day."],
        ["The side that faces the Sun has daytime.", "Wherever the Sun is shining on the Earth, it is day."],
        ["The side that faces away from the Sun has night.",
         "The other half, turned away from the Sun, is dark, and there it is night."],
        ["As the Earth turns, the Sun seems to rise in the east and set in the west.",
         "That turning is why the Sun appears in the east each morning and disappears in the west each "
         "evening."],
    ],
    "seasons": [
        ["The Earth is tilted a little as it travels around the Sun.",
         "Our planet leans slightly to one side on its trip around the Sun."],
        ["For part of the year, one half of the Earth leans toward the Sun and has summer.",
         "When your half of the world leans toward the Sun, the days are long and warm, and it is summer."],
        ["Months later the same half leans away, the days are short, and it is winter.",
         "Half a year later that half leans away, and short cold days bring winter."],
        ["Spring and autumn come in between.",
         "Between them come spring and autumn, when the days are of middle length."],
    ],
    "moon": [
        ["The Moon does not make its own light.", "The Moon has no light of its own."],
        ["It shines because sunlight bounces off it.",
         "What we see is sunlight reflected from its dusty surface."],
        ["As the Moon goes around the Earth, we see different amounts of its sunny side.",
         "On its monthly trip around the Earth, the Moon shows us more or less of its lit half."],
        ["That is why it seems to change from a thin slice to a full circle and back again.",
         "So it grows from a thin crescent to a full moon and then shrinks again."],
    ],
    "plants": [
        ["Green plants make their own food.",
         "A plant does not need to hunt or shop, because it makes its food itself."],
        ["Their leaves catch sunlight and use it to turn water and carbon dioxide into sugar.",
         "Inside each leaf, the energy of sunlight turns water and carbon dioxide into sugar."],
        ["While doing this, plants release oxygen, the gas that animals and people breathe.",
         "As they work, plants give off oxygen, which we need to breathe."],
        ["The roots drink water from the soil and hold the plant firmly in place.",
         "Roots pull water up from the ground and keep the plant from falling over."],
    ],
    "magnets": [
        ["A magnet pulls on things made of iron, such as nails and paper clips.",
         "Hold a magnet near a pin and the pin jumps toward it, because pins contain iron."],
        ["Every magnet has two ends, called the north pole and the south pole.",
         "A magnet has a north pole and a south pole."],
        ["Two different poles pull together, but two of the same pole push apart.",
         "North and south attract each other, while north and north push away."],
        ["A compass needle is a tiny magnet, and it turns to point north.",
         "The needle of a compass is a small magnet that swings round to point north."],
    ],
    "sound": [
        ["Sound is made when something shakes back and forth very fast.",
         "Every sound begins with a quick shaking, called a vibration."],
        ["The shaking pushes on the air, and the push travels outward like ripples on a pond.",
         "These vibrations pass through the air in waves, much like ripples spreading on water."],
        ["When the waves reach your ears, you hear the sound.", "Your ears catch the waves, and you hear."],
        ["If a sound bounces off a wall or a cliff and comes back, we call it an echo.",
         "A shout that bounces back from a hillside is an echo."],
    ],
    "shadows": [
        ["Light travels in straight lines.", "Light moves in straight lines and cannot bend around corners."],
        ["When something solid blocks the light, a dark patch forms behind it.",
         "Put your hand in front of a lamp and the light cannot pass, so a dark shape appears behind it."],
        ["That dark patch is a shadow.", "We call this dark shape a shadow."],
        ["At midday, when the Sun is high, shadows are short; in the morning and evening they are long.",
         "Shadows are shortest around noon and longest early and late in the day."],
    ],
    "storms": [
        ["Lightning is a giant spark of electricity in a storm cloud.",
         "A flash of lightning is a huge electric spark."],
        ["The spark heats the air so quickly that the air bursts outward with a bang, which is thunder.",
         "The air around the flash heats up in an instant and expands with a crash, and that crash is "
         "thunder."],
        ["Light is much faster than sound, so we see the flash before we hear the thunder.",
         "Because light travels faster than sound, the flash always arrives first."],
        ["Counting the seconds between the flash and the bang tells you roughly how far away the storm is.",
         "The longer the wait between flash and rumble, the farther away the storm."],
    ],
    "rainbows": [
        ["A rainbow appears when sunlight shines through raindrops.",
         "Rainbows need two things: sunshine and drops of rain."],
        ["Each drop bends the light and splits it into its colours.",
         "The drops bend the sunlight and spread it into separate colours."],
        [f"The colours always come in the same order: {join_list(RAINBOW)}.",
         f"From the outside edge inward, a rainbow runs {join_list(RAINBOW)}."],
        ["To see one, stand with the Sun behind you and the rain in front of you.",
         "You will only see a rainbow if the Sun is at your back and the rain is ahead."],
    ],
    "floating": [
        ["Some things float on water and others sink.",
         "Drop a cork and a stone into a bowl of water, and only one of them will float."],
        ["A thing floats when it is lighter than the same amount of water.",
         "Whether something floats depends on how heavy it is for its size compared with water."],
        ["Wood, cork and ice float, but stones and coins sink.",
         "Ice and wood float, while a pebble or a key sinks to the bottom."],
        ["A big steel ship floats because its hollow shape holds a lot of air.",
         "Even a heavy ship can float, because its hull is full of air."],
    ],
    "heart": [
        ["Your heart is a strong muscle about the size of your fist.",
         "The heart is a muscle roughly as big as a closed fist."],
        ["It pumps blood around your body all day and all night.",
         "Without resting, it pushes blood through your body."],
        ["Blood carries oxygen and food to every part of you.",
         "The blood brings oxygen and nourishment to all your muscles and organs."],
        ["When you run, your heart beats faster to send more blood to your muscles.",
         "Exercise makes the heart beat faster, because working muscles need more oxygen."],
    ],
    "germs": [
        ["Germs are tiny living things, too small to see without a microscope.",
         "Many germs are so small that you need a microscope to see them."],
        ["Some germs can make us ill.", "A few kinds of germs cause colds and other illnesses."],
        ["Washing your hands with soap and warm water removes most germs.",
         "Soap and water wash germs off your hands, so it is wise to wash before eating."],
        ["Covering your mouth when you cough helps stop germs from spreading.",
         "When you sneeze into a tissue, fewer germs reach other people."],
    ],
    "melting": [
        ["Water can be a solid, a liquid or a gas.",
         "Water comes in three forms: ice, liquid water and steam."],
        ["Below zero degrees Celsius, water freezes into ice.",
         "When it gets colder than zero degrees Celsius, water turns to ice."],
        ["When ice warms up, it melts back into water.", "Warm ice melts and becomes liquid again."],
        ["If water is heated to one hundred degrees Celsius, it boils and turns into steam.",
         "Heat water to one hundred degrees Celsius and it boils away as steam."],
    ],
    "rust": [
        ["Iron left out in the rain slowly turns orange and flaky.",
         "An old iron gate left in wet weather grows an orange crust."],
        ["This crust is called rust.", "That crust is rust."],
        ["Rust forms when iron meets both water and air.",
         "Iron rusts when water and oxygen work on it together."],
        ["Paint or oil keeps the water away and protects the metal.",
         "A coat of paint stops the water from touching the iron, so it rusts more slowly."],
    ],
    "gravity": [
        ["When you drop a ball, it falls to the ground.", "Let go of an apple and it drops."],
        ["The pull that makes it fall is called gravity.", "This pull toward the ground is gravity."],
        ["Gravity also keeps the Moon travelling around the Earth and the Earth travelling around the Sun.",
         "The same pull holds the Moon near the Earth and keeps the planets circling the Sun."],
        ["On the Moon gravity is weaker, so astronauts can jump much higher there.",
         "Because the Moon pulls less strongly, a person on the Moon can leap very high."],
    ],
    "teeth": [
        ["Children have twenty baby teeth.", "A young child has twenty milk teeth."],
        ["Later these fall out and stronger adult teeth grow in their place.",
         "Around the age of six, the baby teeth start to fall out and adult teeth replace them."],
        ["Sugary food helps germs damage teeth.", "Sweets and sugary drinks feed the germs that harm teeth."],
        ["Brushing twice a day keeps teeth clean and healthy.",
         "Brushing in the morning and at night keeps teeth strong."],
    ],
}


def explainer_paragraph(rng: random.Random, pool: Pool) -> str:
    slots = pool.explainers[rng.choice(sorted(pool.explainers))]
    return " ".join(rng.choice(options) for options in slots)


# ---- paragraph writers: cooking -----------------------------------------------------------------

RECIPES = {
    "vegetable soup": {
        "needs": ["an onion", "two carrots", "a potato", "a stick of celery", "a litre of stock",
                  "salt and pepper"],
        "steps": [["Chop the onion, carrots, potato and celery into small pieces.",
                   "Cut all the vegetables into cubes of about the same size."],
                  ["Soften the onion in a little oil for a few minutes.",
                   "Cook the onion gently in a spoonful of oil until it turns soft."],
                  ["Add the other vegetables and the stock.",
                   "Tip in the rest of the vegetables and pour over the stock."],
                  ["Let the soup simmer for about twenty minutes, until the potato is tender.",
                   "Leave it bubbling gently for twenty minutes or so, until a knife slides easily into the "
                   "potato."],
                  ["Season with salt and pepper before serving.",
                   "Taste it, add salt and pepper, and serve it hot."]],
    },
    "pancakes": {
        "needs": ["a cup of flour", "an egg", "a cup of milk", "a pinch of salt", "a little butter"],
        "steps": [["Whisk the flour, egg, milk and salt into a smooth batter.",
                   "Beat the egg and milk into the flour until no lumps remain."],
                  ["Let the batter rest for a few minutes.",
                   "Leave the batter to stand while the pan heats."],
                  ["Melt a little butter in a hot pan.", "Warm a frying pan and wipe it with butter."],
                  ["Pour in a thin layer of batter and cook until the edges turn golden.",
                   "Spoon in enough batter to cover the pan thinly, and wait for small bubbles to appear."],
                  ["Flip the pancake and cook the other side for a minute.",
                   "Turn it over with a spatula and give the second side a minute."]],
    },
    "fruit salad": {
        "needs": ["an apple", "a banana", "a handful of grapes", "an orange", "a squeeze of lemon juice"],
        "steps": [["Wash the fruit well.", "Rinse the apple and the grapes under the tap."],
                  ["Peel the orange and the banana.", "Take the peel off the banana and the orange."],
                  ["Cut everything into bite-sized pieces.",
                   "Slice the fruit into small pieces that fit easily on a spoon."],
                  ["Mix the pieces in a bowl with a little lemon juice, which stops the apple turning brown.",
                   "Stir in a squeeze of lemon juice so the apple keeps its colour."],
                  ["Serve it cold.", "Chill the bowl for a while before serving."]],
    },
    "scrambled eggs": {
        "needs": ["two eggs", "a splash of milk", "a knob of butter", "a pinch of salt"],
        "steps": [["Crack the eggs into a bowl and beat them with the milk and salt.",
                   "Beat the eggs with a fork, adding the milk and a little salt."],
                  ["Melt the butter in a pan over low heat.",
                   "Put the butter in a pan on a gentle heat until it foams."],
                  ["Pour in the eggs and stir slowly with a wooden spoon.",
                   "Add the eggs and keep them moving with a spoon."],
                  ["Take the pan off the heat while the eggs still look a little wet, because they keep "
                   "cooking.",
                   "Stop cooking just before the eggs look done, since the hot pan finishes them."]],
    },
    "rice": {
        "needs": ["a cup of rice", "two cups of water", "a pinch of salt"],
        "steps": [["Rinse the rice in a sieve until the water runs clear.",
                   "Wash the rice under cold water to remove extra starch."],
                  ["Put the rice, water and salt in a pot and bring it to the boil.",
                   "Bring the rice and salted water to the boil in a covered pot."],
                  ["Turn the heat down low, cover the pot and cook for about fifteen minutes.",
                   "Lower the heat, put the lid on and let it cook quietly for fifteen minutes."],
                  ["Leave it to stand for five minutes, then fluff it with a fork.",
                   "Rest the rice off the heat, then loosen the grains with a fork."]],
    },
    "bread": {
        "needs": ["four cups of flour", "a spoonful of yeast", "a spoonful of salt", "warm water"],
        "steps": [["Mix the flour, yeast and salt, then add warm water to make a soft dough.",
                   "Stir warm water into the flour, yeast and salt until a soft dough forms."],
                  ["Knead the dough for ten minutes until it feels smooth and stretchy.",
                   "Push and fold the dough on a floured table for about ten minutes."],
                  ["Cover it and leave it somewhere warm to rise for an hour.",
                   "Let the dough rest in a warm spot until it doubles in size."],
                  ["The dough rises because the yeast makes tiny bubbles of gas.",
                   "Yeast is alive, and the gas it gives off puffs the dough up."],
                  ["Bake the loaf in a hot oven until it sounds hollow when you tap the bottom.",
                   "Bake it until the crust is brown and the loaf sounds hollow underneath."]],
    },
    "porridge": {
        "needs": ["half a cup of oats", "a cup of milk or water", "a pinch of salt",
                  "honey or fruit to finish"],
        "steps": [["Put the oats and the milk in a small pan.", "Pour the oats and milk into a saucepan."],
                  ["Heat it gently, stirring all the time so it does not stick.",
                   "Warm it slowly and keep stirring so nothing burns on the bottom."],
                  ["After about five minutes the oats swell and the porridge turns thick and creamy.",
                   "In five minutes or so the porridge becomes thick."],
                  ["Top it with honey or sliced fruit.", "Serve it with a spoon of honey or some berries."]],
    },
    "lemonade": {
        "needs": ["three lemons", "four cups of cold water", "a few spoons of sugar", "ice"],
        "steps": [["Squeeze the juice from the lemons.",
                   "Roll the lemons on the table, cut them in half and squeeze out the juice."],
                  ["Stir the sugar into a little warm water until it dissolves.",
                   "Dissolve the sugar in a splash of warm water."],
                  ["Mix the lemon juice, the sugar water and the cold water in a jug.",
                   "Pour everything into a jug with the cold water and stir."],
                  ["Add ice and taste it; add more sugar if it is too sour.",
                   "Drop in some ice and adjust the sweetness to your taste."]],
    },
    "tomato sauce": {
        "needs": ["a tin of tomatoes", "a clove of garlic", "a spoon of olive oil", "a few basil leaves",
                  "salt"],
        "steps": [["Warm the olive oil and fry the sliced garlic for a minute.",
                   "Heat the oil and let the garlic sizzle gently without browning."],
                  ["Add the tomatoes and break them up with a spoon.",
                   "Tip in the tomatoes and crush them in the pan."],
                  ["Simmer for fifteen minutes until the sauce thickens.",
                   "Let it bubble for a quarter of an hour so it becomes thick."],
                  ["Stir in the basil and a little salt, then serve it with pasta.",
                   "Finish with torn basil and salt, and spoon it over pasta."]],
    },
    "baked potatoes": {
        "needs": ["four large potatoes", "a little oil", "salt", "butter or cheese for the top"],
        "steps": [["Scrub the potatoes clean.", "Wash the potatoes and dry them."],
                  ["Prick them a few times with a fork so steam can escape.",
                   "Poke each potato with a fork so it does not burst in the oven."],
                  ["Rub them with oil and salt.", "Coat the skins with a little oil and a sprinkle of salt."],
                  ["Bake them for about an hour, until the skin is crisp and the inside is soft.",
                   "Roast them in a hot oven for around an hour, until a knife goes in easily."],
                  ["Cut them open and add butter or cheese.",
                   "Split them and fill them with butter or grated cheese."]],
    },
}
RECIPE_OPENERS = [
    "Here is a simple way to make {dish}.", "Making {dish} at home is easier than many people think.",
    "A beginner cook can make {dish} without much trouble.",
    "Many families have their own way of making {dish}, and this is one of them.",
    "If you are hungry and short of time, try making {dish}.",
]
RECIPE_CLOSERS = [
    "Always wash your hands before you cook.", "Be careful with hot pans and sharp knives.",
    "Cooking is easier when everything is chopped and measured before you start.",
    "Clean up as you go, and the kitchen will stay tidy.",
    "Ask an adult for help with the stove if you are young.",
    "Leftovers should go into the fridge once they have cooled.",
    "A pinch of salt can bring out the flavour of a dish.",
]


def recipe_paragraph(rng: random.Random, pool: Pool) -> str:
    dish = rng.choice(sorted(pool.recipes))
    recipe = pool.recipes[dish]
    opener = rng.choice(RECIPE_OPENERS).format(dish=dish, Dish=cap(dish))
    needs = rng.choice(["You will need {}.", "For this you need {}.", "Gather {} before you begin."])
    sentences = [opener, needs.format(join_list(recipe["needs"]))]
    sentences += [rng.choice(step) for step in recipe["steps"]]
    if rng.random() < 0.6:
        sentences.append(rng.choice(RECIPE_CLOSERS))
    return " ".join(sentences)


# ---- paragraph writers: stories and everyday life ----------------------------------------------

PEOPLE = [("Mia", "she"), ("Leo", "he"), ("Nora", "she"), ("Sam", "he"), ("Ivy", "she"), ("Omar", "he"),
          ("Rosa", "she"), ("Felix", "he"), ("Hana", "she"), ("Jonah", "he"), ("Lena", "she"), ("Theo", "he"),
          ("Ada", "she"), ("Ravi", "he"), ("Zoe", "she"), ("Milo", "he"), ("Iris", "she"), ("Ben", "he"),
          ("Yara", "she"), ("Kofi", "he"), ("Elsa", "she"), ("Tariq", "he"), ("June", "she"), ("Pablo", "he"),
          ("Greta", "she"), ("Noah", "he"), ("Aiko", "she"), ("Luca", "he"), ("Maya", "she"), ("Otto", "he")]
ROLES = ["baker", "farmer", "fisher", "teacher", "shepherd", "painter", "carpenter", "gardener", "tailor",
         "potter", "beekeeper", "lighthouse keeper", "student", "librarian", "weaver", "miller"]
TOWNS = ["Brindlewick", "Hollowmere", "Pebblemoor", "Fernhollow", "Quillby", "Marrowdale", "Thistlecombe",
         "Larkspur Bay", "Wrenfield", "Oakhaven", "Mosslea", "Saltmarsh Cove"]
SETTINGS = ["a village at the edge of a pine forest", "a small town beside a windy bay",
            "a village on a green hill",
            "a busy market town on a wide river", "a quiet village between two mountains",
            "a fishing village of blue and white houses", "a hamlet surrounded by apple orchards",
            "a town built around an old stone bridge"]
TIMES = ["One morning", "Late one afternoon", "One day", "Early one morning", "One Tuesday", "Not long ago",
         "Just before sunset one evening", "Long ago"]
HELPERS = ["an old neighbour", "the miller's daughter", "a travelling musician", "a clever little boy",
           "the village teacher",
           "a kind stranger", "two friends from the next farm", "a wise grandmother"]
MORALS = [
    "Sometimes the best ideas come from asking for help.",
    "Small steps, taken every day, add up to a long way.",
    "Working together makes heavy jobs light.", "Kindness is often repaid when you least expect it.",
    "Patience is worth more than hurry.", "A problem shared is a problem halved.",
    "Everyone in a village has something to offer.", "Being careful at the start saves trouble at the end.",
]

# Each problem: how it appears (and when, if not any time), a first attempt that fails, the fix, the end.
PROBLEMS = [
    {"problem": ["a storm washed away the little bridge over the river",
                 "the wooden footbridge was carried off by a flood"],
     "fail": ["{P} tried to wade across, but the water was too fast.",
              "{P} thought of jumping from stone to stone, but the stones were slippery."],
     "fix": ["Together they tied planks to two long logs and laid a new bridge across the water.",
             "They cut a tall, dead tree so that it fell neatly across the stream, and nailed a rail along "
             "its side."],
     "end": ["By evening the children could cross to school again.",
             "The next day the market carts rolled over the new bridge."]},
    {"problem": ["the village well ran dry after a long spell without rain",
                 "no water came up from the old well"],
     "fail": ["{P} lowered the bucket deeper, but it came up full of mud.",
              "{P} waited for rain, but the sky stayed clear."],
     "fix": ["They followed a line of green reeds up the hill and found a spring, then dug a channel down to "
             "the village.",
             "They cleared the stones that had blocked the stream above the village, and the water flowed "
             "again."],
     "end": ["Soon every garden was green once more.", "That night everyone drank cool, clean water."]},
    {"problem": ["the oven in the bakery broke a day before the fair",
                 "the bakery oven cracked just before the fair"],
     "fail": ["{P} tried to bake in a small kitchen stove, but only two loaves fitted inside.",
              "{P} borrowed a neighbour's oven, but it was far too slow."],
     "fix": ["They built a round clay oven in the square, lit a fire in it, and baked the bread there.",
             "Every family baked a few loaves at home and carried them to the fair in baskets."],
     "end": ["The fair had more bread than ever before.",
             "People said it was the best bread the town had ever tasted."]},
    {"problem": ["a goat wandered off into the hills",
                 "the youngest goat slipped through a gap in the fence and vanished"],
     "fail": ["{P} called and called, but only the wind answered.",
              "{P} searched the meadow until dark without any luck."],
     "fix": ["Listening carefully, they heard a tiny bell high on a ledge, and they guided the goat down "
             "with a rope.",
             "They scattered oats along the path, and the hungry goat followed the trail home."],
     "end": ["The goat was back in its pen before supper.",
             "After that, the gap in the fence was mended at once."]},
    {"problem": ["deep snow blocked the only road out of the valley",
                 "a heavy snowfall buried the road to town"],
     "fail": ["{P} tried to shovel a path alone, but the snow kept falling.",
              "{P} tried to ride a horse through the drifts, but it sank to its knees."],
     "fix": ["Everyone brought a shovel, and working in shifts they cleared the road in a single day.",
             "They tied wide wooden boards to their boots and walked over the snow to fetch supplies."],
     "end": ["The shop shelves were full again by the weekend.",
             "When the road opened, the whole valley cheered."]},
    {"when": ["One foggy night", "Late one stormy evening"],
     "problem": ["the lamp in the lighthouse went out",
                 "the lighthouse lamp flickered and died while ships were near"],
     "fail": ["{P} tried to relight the wick, but the oil had run out.",
              "{P} tried a small lantern, but its light was far too weak."],
     "fix": ["They lit a ring of bright fires on the cliff so the ships could see the rocks.",
             "They carried oil up the steep stairs in buckets and got the great lamp burning again."],
     "end": ["Every boat reached the harbour safely.", "In the morning, the sailors came to say thank you."]},
    {"problem": ["a kite got stuck in the tallest oak in the park",
                 "a bright red kite was caught at the very top of a tree"],
     "fail": ["{P} threw a ball at it, but the ball got stuck too.",
              "{P} climbed the first few branches, but they were too thin higher up."],
     "fix": ["They tied a hook to a long bamboo pole and gently lifted the string free.",
             "They waited for the afternoon breeze, tugged the string at just the right moment, and the kite "
             "floated loose."],
     "end": ["Soon the kite was dancing in the sky again.",
             "The little girl who owned it laughed and ran off across the grass."]},
    {"problem": ["the roof of the school began to leak",
                 "rain started dripping through the schoolroom ceiling"],
     "fail": ["{P} put buckets under the drips, but there were more drips than buckets.",
              "{P} stuffed cloth into the cracks, but the water came through anyway."],
     "fix": ["On the first dry day, the parents climbed up with new tiles and patched every hole.",
             "They stretched a large waxed cloth over the roof until a roofer could come."],
     "end": ["The lessons went on in a dry room.",
             "The children painted a picture of the roof menders to say thank you."]},
    {"problem": ["the apples ripened faster than anyone could pick them",
                 "the orchard was suddenly heavy with ripe apples"],
     "fail": ["{P} picked from dawn to dusk but could not keep up.",
              "{P} tried to shake the trees, but the apples bruised when they fell."],
     "fix": ["They invited the whole village to a picking day, and everyone went home with a basket.",
             "They spread soft straw under the trees and made juice from the apples that fell."],
     "end": ["The cellar was full of juice and apple jam all winter.", "Nothing went to waste that year."]},
    {"problem": ["a lost puppy turned up shivering at the garden gate",
                 "a small wet puppy with no collar appeared on the doorstep"],
     "fail": ["{P} asked at the nearest houses, but nobody knew the puppy.",
              "{P} put up one sign at the shop, but no one called."],
     "fix": ["They drew pictures of the puppy and pinned them all over town, and at last a worried family "
             "came to the door.",
             "They asked the postman, who knew every house, and he remembered a family that had lost a dog."],
     "end": ["The puppy licked everyone's hands as it left.",
             "The family came back the next week with a cake."]},
    {"problem": ["the boat's sail tore in the middle of the bay",
                 "a sudden gust ripped the sail of the little fishing boat"],
     "fail": ["{P} tried to row home, but the tide was pulling the other way.",
              "{P} tried to tie the torn pieces together, but the knots would not hold."],
     "fix": ["They used a spare blanket as a small sail and tacked slowly back to the harbour.",
             "They waved a bright jacket until another boat saw them and towed them home."],
     "end": ["That winter they sewed a new, stronger sail.",
             "From then on, a spare sail always lay in the bottom of the boat."]},
    {"problem": ["the clock on the town hall stopped at a quarter past three",
                 "the town hall clock fell silent"],
     "fail": ["{P} climbed the tower and wound the key, but the hands still did not move.",
              "{P} oiled the gears, but the clock stayed stuck."],
     "fix": ["They found a pigeon's nest jammed between two wheels, moved it gently to a ledge, and the "
             "clock began to tick.",
             "They sent for the retired clockmaker, who replaced a worn spring with one from an old music "
             "box."],
     "end": ["At noon the bell rang twelve times, and people in the square clapped.",
             "Since then, someone climbs the tower every month to check the gears."]},
    {"problem": ["the bees left their hive", "the beehive was suddenly silent and empty"],
     "fail": ["{P} searched the garden but saw no bees at all.",
              "{P} waited by the hive, but the bees did not come back."],
     "fix": ["They found the swarm hanging like a brown cloud from a branch and gently shook it into a new "
             "box.",
             "They followed the humming to the old barn and carried the swarm back in a basket."],
     "end": ["By autumn there was honey on every table.",
             "The bees settled down and made honey until the frost."]},
]


def story_paragraph(rng: random.Random, pool: Pool) -> str:
    name, pron = rng.choice(pool.people)
    role, town, setting = rng.choice(ROLES), rng.choice(TOWNS), rng.choice(SETTINGS)
    story, helper = rng.choice(pool.problems), rng.choice(pool.helpers)
    poss = "her" if pron == "she" else "his"
    opening = rng.choice([
        f"In {town}, {setting}, there lived a {role} named {name}.",
        f"{name} was a {role} in {town}, {setting}.",
        f"There was once a {role} called {name}, who lived in {town}, {setting}.",
    ])
    detail = rng.choice([
        f"{cap(pron)} liked to get up early and listen to the birds.",
        f"Everyone in town knew {name} for {poss} cheerful whistling.",
        f"{cap(pron)} worked hard and always had time for a chat.",
        f"{name} kept a small garden full of herbs behind the house.",
        f"Every evening {name} walked along the river with {poss} dog.",
    ])
    trouble = f"{rng.choice(story.get('when', TIMES))}, {rng.choice(story['problem'])}."
    worry = rng.choice([f"{name} did not know what to do.", f"{name} frowned and thought hard.",
                        f"\"What shall we do now?\" asked {name}.",
                        f"{name} felt worried, but {pron} did not give up."])
    fail = rng.choice(story["fail"]).format(P=name)
    help_ = rng.choice([f"Then {helper} came by with an idea.",
                        f"Just then {helper} arrived and offered to help.",
                        f"{cap(helper)} heard about the trouble and came to lend a hand."])
    fix, end = rng.choice(story["fix"]), rng.choice(story["end"])
    sentences = [opening, detail, trouble, worry, fail, help_, fix, end]
    if rng.random() < 0.5:
        sentences.append(rng.choice(MORALS))
    return " ".join(sentences)


FABLE_ANIMALS = ["sparrow", "tortoise", "fox", "mouse", "crow", "rabbit", "hedgehog", "goose",
                 "squirrel", "badger"]
FABLES = [
    ("A {a} and a {b} found a heap of ripe berries at the edge of a field.",
     ["The {a} wanted to eat them all at once, but the {b} suggested saving some for the cold months.",
      "The {b} said they should keep half of the berries for winter, and the {a} grumbled but agreed."],
     ["When the snow came, the two friends had plenty to share.",
      "In winter, when food was scarce, they were glad of their store."]),
    ("A {a} was very proud of how fast it could run, and it laughed at a slow {b}.",
     ["One day a river flooded the path, and only the {b}, who knew the hidden stepping stones, could cross.",
      "But when the {a} got lost in the fog, it was the patient {b} that led it home."],
     ["After that, the {a} never laughed at anyone again.",
      "The {a} learned that every creature has its own gifts."]),
    ("A tired {a} asked a busy {b} to share its shelter from the rain.",
     ["The {b} was grumpy at first, but it moved over and made room.",
      "The {b} hesitated, then opened its door wide."],
     ["Weeks later, the {a} warned the {b} of a hungry owl, and saved its life.",
      "When the {b} needed help later, the {a} was the first to come."]),
]


def fable_paragraph(rng: random.Random, pool: Pool) -> str:
    a, b = rng.sample(FABLE_ANIMALS, 2)
    start, middles, ends = rng.choice(pool.fables)
    text = [start, rng.choice(middles), rng.choice(ends), rng.choice(MORALS)]
    return " ".join(s.format(a=a, b=b) for s in text)


PAST = [
    [["Long ago, before there were cars or trains, people travelled on foot, on horseback or by boat.",
      "In the distant past, a journey meant walking, riding a horse, or sailing."],
     ["A trip that takes an hour today could take several days.",
      "Going to the next town could take a whole day."]],
    [["The first farmers learned to plant seeds and keep animals.",
      "Thousands of years ago, people began to grow crops instead of only gathering wild food."],
     ["Villages grew up around the fields, and some villages became towns.",
      "Because farms stayed in one place, people built lasting houses, and small villages slowly grew."]],
    [["Before clocks were common, people told the time by looking at the Sun.",
      "People once guessed the hour from the position of the Sun in the sky."],
     ["A sundial uses the shadow of a stick to show the hour.",
      "A sundial shows the time with a moving shadow."]],
    [["Markets have been meeting places for a very long time.",
      "For centuries, the market square was the heart of many towns."],
     ["Farmers brought eggs, cheese and vegetables, and craftspeople sold pots, cloth and tools.",
      "People came to trade food, cloth and tools, and to hear the news."]],
    [["Before printing, every book had to be copied by hand.",
      "Long ago, books were written out by hand, one copy at a time."],
     ["The printing press made books much cheaper, and many more people learned to read.",
      "Once books could be printed, they became cheaper, and reading spread widely."]],
    [["In old times, many houses were lit by candles and oil lamps.",
      "Before electric light, evenings were lit by candles and lamps."],
     ["Today we light a room by pressing a switch.",
      "Now a light switch does in a moment what once took a match and a wick."]],
    [["People have always written messages to each other.",
      "Sending letters is an old way to keep in touch."],
     ["Once a letter could take weeks to arrive; now a message can cross the world in a second.",
      "Letters used to travel slowly by coach and ship, but today messages arrive almost instantly."]],
]
TOWN_HISTORY = [
    "{town} began as a handful of houses beside a shallow place in the river where carts could cross.",
    "The first people of {town} were shepherds who brought their flocks to the high meadows each summer.",
    "{town} grew up around a mill that ground the grain of the farms nearby.",
    "Fishing families settled in {town} because the bay was sheltered from the worst storms.",
]
TOWN_LATER = [
    "Over the years a school, a bakery and a small library were built around the square.",
    "Later a railway line arrived, and the town doubled in size.",
    "Today the old market hall is used for dances and a weekly market.",
    "A festival is still held there every autumn to celebrate the harvest.",
]


def past_paragraph(rng: random.Random, pool: Pool) -> str:
    if rng.random() < 0.4:
        town = rng.choice(TOWNS)
        return f"{rng.choice(TOWN_HISTORY).format(town=town)} {' '.join(rng.sample(TOWN_LATER, 2))}"
    return " ".join(rng.choice(options) for options in rng.choice(pool.past))


DAILY = [
    "{N} wakes up at seven o'clock, washes {p} face and eats breakfast.",
    "After breakfast, {N} walks to school with a friend.",
    "At lunchtime {N} eats a sandwich and an apple.",
    "In the afternoon, {N} reads a book or plays in the park.",
    "Before bed, {N} brushes {p} teeth and puts on pyjamas.",
    "On Saturdays, {N} helps {p} grandfather in the garden.",
    "On rainy days {N} likes to draw pictures of boats.",
    "In the evening the family eats dinner together and talks about the day.",
]


def daily_paragraph(rng: random.Random, pool: Pool) -> str:
    name, pron = rng.choice(pool.people)
    poss = "her" if pron == "she" else "his"
    return " ".join(s.format(N=name, p=poss) for s in rng.sample(DAILY, rng.randint(3, 5)))


# ---- the mixture ------------------------------------------------------------------------------

HELDOUT_PEOPLE = [("Edda", "she"), ("Marek", "he"), ("Suki", "she"), ("Bram", "he"), ("Alma", "she"),
                  ("Idris", "he"), ("Wren", "she"), ("Cosmo", "he")]
HELDOUT_HELPERS = ["a retired sailor", "the girl from the bakery", "two cousins visiting for the summer",
                   "the old clockmaker's apprentice"]
HELDOUT_EXPLAINERS, HELDOUT_RECIPES = ("floating", "gravity", "rust", "teeth"), ("baked potatoes", "lemonade")
N_HELDOUT_PROBLEMS, N_HELDOUT_FABLES, N_HELDOUT_PAST = 3, 1, 2  # the last entries of those tables


@dataclass(frozen=True)
class Pool:
    """The people, stories, explanations and recipes one text draws from.

    The held-out text has a pool of its own (other names, other stories, other topics), so its
    paragraphs are new as wholes, not just corpus paragraphs with a few sentences swapped.
    """

    people: list
    helpers: list
    problems: list
    explainers: dict
    recipes: dict
    fables: list
    past: list


CORPUS_POOL = Pool(PEOPLE, HELPERS, PROBLEMS[:-N_HELDOUT_PROBLEMS],
                   {k: v for k, v in EXPLAINERS.items() if k not in HELDOUT_EXPLAINERS},
                   {k: v for k, v in RECIPES.items() if k not in HELDOUT_RECIPES},
                   FABLES[:-N_HELDOUT_FABLES], PAST[:-N_HELDOUT_PAST])
HELDOUT_POOL = Pool(HELDOUT_PEOPLE, HELDOUT_HELPERS, PROBLEMS[-N_HELDOUT_PROBLEMS:],
                    {k: EXPLAINERS[k] for k in HELDOUT_EXPLAINERS}, {k: RECIPES[k] for k in HELDOUT_RECIPES},
                    FABLES[-N_HELDOUT_FABLES:], PAST[-N_HELDOUT_PAST:])


def writers(pool: Pool) -> list[tuple]:
    """(paragraph writer, weight): the mixture of topics, the same for the corpus and held-out text."""
    def use(writer):
        return partial(writer, pool=pool)

    return [(country_paragraph, 5), (colour_paragraph, 2), (animal_paragraph, 3), (use(number_paragraph), 4),
            (calendar_paragraph, 2), (shape_paragraph, 1), (word_paragraph, 2), (world_paragraph, 3),
            (use(explainer_paragraph), 4), (use(recipe_paragraph), 3), (use(story_paragraph), 6),
            (use(fable_paragraph), 1), (use(past_paragraph), 2), (use(daily_paragraph), 1)]


def paragraph(rng: random.Random, pool: Pool = CORPUS_POOL) -> str:
    """One paragraph of a randomly chosen kind, drawing its material from ``pool``."""
    fns, weights = zip(*writers(pool), strict=True)
    return rng.choices(fns, weights=weights)[0](rng)


def fact_sweep(rng: random.Random) -> list[str]:
    """Every probed fact in its canonical wording (``cloze answer``), shuffled into short paragraphs.

    Each sweep states every fact the QA probe asks about once; the random paragraphs add other
    wordings of the same facts.
    """
    sentences = [f"{cloze} {answer}{tail}." for _, cloze, answer, tail, _ in probes()]
    rng.shuffle(sentences)
    return [" ".join(sentences[i:i + 5]) for i in range(0, len(sentences), 5)]


# ---- the QA probe -----------------------------------------------------------------------------


def probes() -> list[tuple[str, str, str, str, list[str]]]:
    """(question, cloze, answer, tail, choice pool) of every general-knowledge question.

    The corpus states each one as the sentence ``f"{cloze} {answer}{tail}."``; answers are single
    words or numbers so that matching them is unambiguous.
    """
    out = []
    capitals = [k for _, k, _, _ in COUNTRIES]
    for country, capital, _, _ in COUNTRIES[:24]:
        out.append((f"What is the capital of {country}?",
                    f"The capital of {country} is", capital, "", capitals))
    colours = sorted({c for _, c in COLOURS})
    named = dict(COLOURS)
    for asked, thing in COLOUR_QUESTIONS.items():
        out.append((f"What colour is {asked}?", f"The colour of {thing} is", named[thing], "", colours))
    for a, b, mixed in MIXES[:3]:
        out.append((f"What colour do you get when you mix {a} and {b}?",
                    f"Mixing {a} and {b} gives", mixed, "", colours))
    young = sorted({y for y, *_ in ANIMALS.values() if y})
    for animal in ("cat", "dog", "cow", "sheep", "horse", "frog", "pig", "duck"):
        y = ANIMALS[animal][0]
        out.append((f"What is a baby {animal} called?",
                    f"A baby {animal} is called {article(y)}", y, "", young))
    counts = [words(n) for n in (2, 3, 4, 5, 6, 7, 8, 10, 12, 24, 60)]
    for animal in ("spider", "bee", "dog"):
        legs = words(ANIMALS[animal][2])
        out.append((f"How many legs does a {animal} have?", f"A {animal} has", legs, " legs", counts))
    sounds = sorted({s for _, s, _, _ in ANIMALS.values() if s})
    for animal in ("cow", "duck", "dog", "owl"):
        a = cap(article(animal))
        out.append((f"What sound does {article(animal)} {animal} make?",
                    f"{a} {animal} says", ANIMALS[animal][1], "", sounds))
    for shape, sides in SHAPES[:2] + SHAPES[4:]:
        a = article(shape)
        question = f"How many sides does {a} {shape} have?"
        out.append((question, f"{cap(a)} {shape} has", words(sides), " sides", counts))
    for big, n, small in UNITS[:5]:
        a = article(big)
        out.append((f"How many {small} are there in {a} {big}?",
                    f"{cap(a)} {big} has", words(n), f" {small}", counts))
    out += [
        ("What is the first month of the year?", "The first month of the year is", "January", "", MONTHS),
        ("What day comes after Monday?", "The day after Monday is", "Tuesday", "", DAYS),
        ("What day comes after Friday?", "The day after Friday is", "Saturday", "", DAYS),
        ("Which planet is closest to the Sun?", "The planet closest to the Sun is", "Mercury", "", PLANETS),
        ("Which is the largest planet?", "The largest planet is", "Jupiter", "", PLANETS),
        ("Which planet is called the red planet?", "The red planet is", "Mars", "", PLANETS),
    ]
    opposites = [w for pair in OPPOSITES for w in pair]
    for a, b in OPPOSITES[:5]:
        out.append((f"What is the opposite of {a}?", f"The opposite of {a} is", b, "", opposites))
    def near(n):  # wrong answers close to the right one, the mistakes a learner would make
        return [str(m) for m in range(max(0, n - 3), n + 4)]

    for a, b in [(2, 3), (4, 5), (6, 7), (3, 9), (8, 8), (1, 6)]:
        out.append((f"What is {a} plus {b}?", f"{a} + {b} =", str(a + b), "", near(a + b)))
    for a, b in [(9, 4), (15, 5), (12, 7)]:
        out.append((f"What is {a} minus {b}?", f"{a} - {b} =", str(a - b), "", near(a - b)))
    for a, b in [(3, 4), (5, 6), (7, 2)]:
        out.append((f"What is {a} times {b}?", f"{a} x {b} =", str(a * b), "", near(a * b)))
    return out


def qa_records(rng: random.Random) -> list[dict]:
    """The QA probe: question, answer, four choices (answer included) and the cloze statement."""
    records = []
    for question, cloze, answer, _, pool in probes():
        others = sorted({p for p in pool if p != answer})
        choices = [*rng.sample(others, 3), answer]
        rng.shuffle(choices)
        records.append({"question": question, "answer": answer, "choices": choices, "cloze": cloze})
    return records
