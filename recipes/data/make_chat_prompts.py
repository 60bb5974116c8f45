"""Write recipes/data/chat_prompts.jsonl and chat_prompts_2.jsonl: general chat, explanation and code
prompts for `sdlm distill`.

The GSM8K/MBPP corpus teaches the drafts math and code answers only. These prompts widen it with
the other kinds of request a chat model gets: explanations, how-tos, comparisons, short creative
writing and questions about Python's standard library. They are built offline from templates and
topic lists (below) and from the standard library itself, so the file is reproducible:

    python recipes/data/make_chat_prompts.py

The first file (3345 prompts) made the answers of the stage-2 corpus; the second ("round 2") adds new
phrasings of the same topics and new topics, never a prompt of the first file.

Held out: no topic of bench/prompts/chat.jsonl appears here (checked at the end), so that
benchmark stays unseen by training.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "chat_prompts.jsonl"
OUT2 = HERE / "chat_prompts_2.jsonl"
BENCH = HERE.parent.parent / "bench" / "prompts" / "chat.jsonl"

CONCEPTS = """
gravity; electricity; magnetism; the water cycle; plate tectonics; volcanoes; earthquakes; black holes;
the Big Bang; the speed of light; atoms; molecules; DNA; evolution; natural selection; the immune system;
the human heart; the nervous system; digestion; metabolism; antibiotics; bacteria; viruses; the placebo effect;
climate change; the greenhouse effect; renewable energy; solar power; wind power; nuclear energy; batteries;
semiconductors; the internet; email; encryption; passwords; cloud computing; databases; operating systems;
compilers; recursion; sorting algorithms; binary numbers; prime numbers; fractions; percentages; probability;
statistics; the Pythagorean theorem; algebra; calculus; compound interest; inflation; supply and demand;
taxes; budgeting; the stock market; banks; credit scores; insurance; democracy; the separation of powers;
the Roman Empire; the Renaissance; the Industrial Revolution; the printing press; ancient Egypt; the Silk Road;
the French Revolution; the Cold War; the Moon landing; the Olympic Games; world languages; grammar; poetry;
metaphors; storytelling; music theory; the piano; photography; painting; architecture; bridges; skyscrapers;
airplanes; rockets; satellites; GPS; electric cars; trains; the wheel; clocks; tides; rainbows; clouds;
lightning; hurricanes; deserts; rainforests; coral reefs; bees; ants; whales; dolphins; elephants; birds;
migration of birds; trees; soil; composting; recycling; plastic pollution; clean water; nutrition; vitamins;
protein; hydration; meditation; stress; habits; motivation; time management; teamwork; leadership;
negotiation; public speaking; critical thinking; the scientific method; memory; learning a language;
friendship; empathy; kindness; curiosity; creativity; chess; football; basketball; running; yoga; cooking
rice; baking bread; coffee; tea; chocolate; cheese; spices; the calendar; time zones; maps; the Sun;
the Moon; Mars; Jupiter; comets; stars; galaxies; telescopes; microscopes; thermometers; magnets; sound;
echoes; colors; mirrors; lenses; friction; energy; heat; temperature; pressure; density; buoyancy; levers
"""

TASKS = """
save money on groceries; learn to cook; start running; improve my handwriting; stay focused while studying;
prepare for a job interview; write a cover letter; keep a houseplant alive; organize my closet; plan a birthday party;
learn to play the guitar; get better at math; read more books; wake up earlier; make new friends in a new city;
reduce screen time; keep a journal; start a small garden; clean a kitchen quickly; make a good first impression;
take better photos with a phone; write a good essay; remember names; give constructive feedback; ask for a raise;
plan a road trip; pack a suitcase efficiently; learn to swim; train a puppy; care for a cat; fix a flat bicycle tire;
make a budget; pay off debt; start investing; learn to code; debug a program; write readable code; learn touch typing;
stay hydrated; eat more vegetables; cook a simple pasta dinner; make a cup of tea; bake cookies; brew coffee at home;
calm down before an exam; deal with procrastination; prepare a presentation; run an effective meeting; study for a test;
learn history; teach a child to read; be a better listener; resolve a disagreement; say no politely; back up my files;
protect my privacy online; choose a strong password; set up a home network; recycle properly; save electricity at home
"""

THINGS = """
the mountains; a rainy day; autumn leaves; the night sky; a quiet library; an old lighthouse; a busy city street;
a cup of coffee; a lost key; a friendly robot; a small village; a desert island; a snowy morning; a garden in spring;
a long train journey; a brave little mouse; a dragon who loves books; a forgotten toy; the first day of school;
a summer festival; a thunderstorm; a river; the moon; a candle; an old tree; a market; a bicycle; a letter from a friend;
a kite; a clock tower; a cat on a windowsill; the desert at sunset; a sailing ship; a mountain lake; a bakery at dawn;
a time traveller; a talking parrot; a hidden door; a map to treasure; a kind stranger
"""

PAIRS = """
a virus and a bacterium; a star and a planet; speed and velocity; mass and weight; an atom and a molecule;
a democracy and a monarchy; a loan and a grant; saving and investing; a stock and a bond; a noun and a verb;
a simile and a metaphor; RAM and storage; hardware and software; a compiler and an interpreter; HTTP and HTTPS;
a function and a method; a class and an object; a for loop and a while loop; a bug and a feature; Python and JavaScript;
a lake and a sea; a hurricane and a tornado; a frog and a toad; a crocodile and an alligator; a rabbit and a hare;
an ocean and a sea; a fruit and a vegetable; baking soda and baking powder; a city and a town; a village and a town;
a comet and an asteroid; a meteor and a meteorite; heat and temperature; AC and DC current; a want and a need;
a goal and a plan; a fact and an opinion; a hypothesis and a theory; an introvert and an extrovert;
a CPU and a GPU; a router and a modem; a list and a dictionary in Python; a set and a list in Python;
a shallow copy and a deep copy; an array and a linked list; a stack and a queue; git merge and git rebase
"""

DEVICES = """
a microwave oven; a washing machine; a bicycle; a car engine; an electric motor; a light bulb; a solar panel;
a battery; a telephone; a camera; a compass; a thermostat; an elevator; a dishwasher; a vacuum cleaner;
a smartphone touchscreen; a wind turbine; a jet engine; a submarine; a parachute; a lock and key; a zipper;
a printer; a speaker; a microphone; Wi-Fi; a barcode scanner; a credit card payment; a search engine; a spreadsheet
"""

CONCEPT_TEMPLATES = [
    "Explain {x} in simple terms.",
    "What is {x}?",
    "Give me three interesting facts about {x}.",
    "Why is {x} important?",
    "Write a short paragraph about {x}.",
    "Explain {x} to a beginner.",
]
TASK_TEMPLATES = ["How do I {x}?", "Give me three tips to {x}.", "What is a simple plan to {x}?"]
THING_TEMPLATES = ["Write a short poem about {x}.", "Write a short story about {x}.", "Describe {x} in a few sentences."]
PAIR_TEMPLATES = ["What is the difference between {x}?", "Compare {x}."]
DEVICE_TEMPLATES = ["How does {x} work?", "Explain how {x} works, step by step."]

STDLIB = [
    "os", "os.path", "sys", "json", "re", "math", "random", "itertools", "functools", "collections",
    "datetime", "time", "string", "textwrap", "statistics", "pathlib", "shutil", "glob", "csv", "heapq",
    "bisect", "operator", "copy", "uuid", "hashlib", "base64", "zipfile", "subprocess", "logging", "argparse",
]
STDLIB_FUNCTIONS = 600  # a sample, so that library trivia does not outweigh the rest
CODE_TEMPLATES = [
    "What does the Python function `{x}` do? Give a short example.",
    "How do I use `{x}` in Python?",
    "Write a short Python example that uses `{x}` and explain it.",
]
CODE_TASKS = """
reverse a string; check if a number is prime; count the words in a sentence; find the largest number in a list;
remove duplicates from a list; read a text file line by line; merge two dictionaries; sort a list of tuples by the
second item; compute the factorial of a number; check if a string is a palindrome; flatten a nested list;
convert Celsius to Fahrenheit; count vowels in a string; compute the average of a list; find common elements of two
lists; generate the Fibonacci sequence; validate an email address with a regular expression; capitalize every word;
find the second largest number; swap two variables; check if a year is a leap year; sum the digits of a number;
convert a list to a string; find the most common element in a list; split a list into chunks
"""
CODE_TASK_TEMPLATES = ["Write a Python function to {x}.", "How can I {x} in Python? Show the code and explain it."]


# round 2: new phrasings of the topics above, and new topics
CONCEPTS_2 = """
the periodic table; chemical reactions; acids and bases; rust; fire; ice; steam engines; electricity grids;
transistors; computer memory; the CPU; pixels; video compression; sound waves; radio; television; smartphones;
social media; search engines; artificial intelligence; robots; 3D printing; blockchain; open source software;
version control; unit testing; software bugs; spreadsheets; algorithms; data structures; binary search;
hash functions; regular expressions; the command line; variables in programming; loops in programming;
functions in programming; object-oriented programming; APIs; web browsers; websites; cookies on the web;
the immune response to a cold; allergies; sleep cycles; dreams; the brain; muscles; bones; the skin; blood;
the lungs; the kidneys; hormones; genetics; cells; photosynthesis in algae; fungi; mushrooms; lichens; moss;
wolves; bears; owls; penguins; octopuses; sharks; butterflies; spiders; snakes; frogs; horses; cows; honey;
volcanic islands; glaciers; rivers; lakes; waterfalls; caves; mountains; canyons; the ocean floor; the Arctic;
Antarctica; the Sahara; the Amazon river; the Nile; the Himalayas; the equator; latitude and longitude; seasons
on Mars; the solar system; eclipses; meteor showers; the Milky Way; astronauts; the International Space Station;
money; trade; markets; entrepreneurship; advertising; marketing; customer service; small businesses; contracts;
voting; elections; the United Nations; human rights; laws; courts; juries; newspapers; libraries; museums;
mythology; fairy tales; the alphabet; writing systems; dictionaries; translation; sign language; handwriting;
theatre; film; animation; comics; novels; jazz; rock music; classical music; the violin; drums; dance; sculpture;
pottery; gardening; beekeeping; farming; irrigation; bread; pasta; rice; fermentation; yogurt; salt; sugar;
olive oil; vegetables; fruit; breakfast cereals; sandwiches; soup; pizza; restaurants; kitchens; knives;
first aid; fitness; stretching; walking; cycling; swimming; tennis; volunteering; patience; honesty; gratitude;
resilience; decision making; problem solving; goal setting; feedback; mentoring; remote work; productivity;
email etiquette; online safety; phishing; backups; privacy; digital footprints; ergonomics; posture
"""
CONCEPT_TEMPLATES_2 = [
    "How would you explain {x} to a child?",
    "What are some common misconceptions about {x}?",
    "Tell me about {x}.",
    "What should everyone know about {x}?",
    "Describe {x} in a few sentences.",
    "Can you summarize what {x} is and why it matters?",
]
TASKS_2 = """
learn a new word every day; improve my memory; stop biting my nails; sleep better on weekdays; write a thank-you
note; apologize to a friend; start a book club; plan a picnic; host a dinner party; keep my desk tidy; learn to draw;
learn to juggle; make a paper airplane; sharpen a knife safely; change a light bulb; unclog a sink; paint a room;
hang a picture straight; repot a plant; grow tomatoes; make a smoothie; cook an omelette; make pancakes;
make a salad dressing; store leftovers safely; plan meals for a week; shop for a used car; rent my first apartment;
prepare for a marathon; stretch after a run; carry groceries without back pain; teach my dog to sit;
introduce a new cat to my home; help a friend who is sad; write a short speech; tell a good joke; start a podcast;
write a blog post; edit my own writing; learn Python as a beginner; read someone else's code; write a unit test;
name variables well; use git for the first time; choose a laptop; speed up a slow computer; organize my photos;
write a polite complaint; prepare for a long flight; beat jet lag; learn basic first aid; plan a study schedule
"""
TASK_TEMPLATES_2 = ["What is the best way to {x}?", "I want to {x}. Where should I start?", "List the steps to {x}."]
THINGS_2 = """
a lighthouse keeper; a robot learning to paint; a city in the clouds; an owl in the forest; a snowman in spring;
a child's first kite; a fisherman at dawn; a train station at night; a lonely astronaut; a garden gnome;
a river that talks; the last leaf of autumn; a violin in an attic; a sleepy dragon; a ship in a bottle;
a family of ducks; an old map; a busy beehive; a rainy afternoon in a cafe; the smell of fresh bread;
a fox in the snow; a mountain village; a broken umbrella; a new pair of shoes; a starry beach
"""
THING_TEMPLATES_2 = ["Write a haiku about {x}.", "Write four lines of verse about {x}.", "Tell a very short story about {x}."]
CODE_TASKS_2 = """
count the characters in a string; find the index of an item in a list; check if a list is sorted; reverse a list;
find the minimum of a list without min(); join a list of words with commas; count how often each word occurs;
remove whitespace from a string; check if two strings are anagrams; convert a string to a number safely;
find all even numbers in a list; square every number in a list; zip two lists into a dictionary; read a CSV file;
write a list of lines to a file; get today's date; measure how long a function takes; shuffle a list;
pick a random item from a list; compute the greatest common divisor; convert a number to binary; check if a key
is in a dictionary; sort a dictionary by value; find duplicates in a list; compute the median of a list;
transpose a matrix; rotate a list by k places; remove punctuation from a string; count lines in a file;
make a simple class for a bank account
"""
CODE_TASK_TEMPLATES_2 = ["Show me how to {x} in Python.", "Write a Python snippet to {x}, with a short explanation."]


def _items(block: str) -> list[str]:
    return [s.strip() for s in block.replace("\n", " ").split(";") if s.strip()]


def _stdlib_functions() -> list[str]:
    names = []
    for mod_name in STDLIB:
        mod = importlib.import_module(mod_name)
        public = getattr(mod, "__all__", None) or [n for n in dir(mod) if not n.startswith("_")]
        for n in sorted(public):
            obj = getattr(mod, n, None)
            if callable(obj) and (inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)):
                if getattr(obj, "__doc__", None):
                    names.append(f"{mod_name}.{n}")
    return random.Random(0).sample(names, min(len(names), STDLIB_FUNCTIONS))


def _words(s: str) -> set[str]:
    return {w for w in re.findall(r"[a-z]+", s.lower()) if len(w) > 3}


def _expand(groups) -> list[tuple[str, str]]:
    prompts = []
    for group, items, templates in groups:
        for x in items:
            for t in templates:
                p = t.format(x=x)
                prompts.append((group, p[0].upper() + p[1:]))
    return prompts


def _write(prompts: list[tuple[str, str]], out: Path, exclude: set[str] = frozenset()) -> list[str]:
    """Drop held-out topics and ``exclude``, shuffle, write; return the prompts written."""
    # held out: drop any prompt that shares its topic with a benchmark chat prompt
    bench = [json.loads(line)["prompt"] for line in BENCH.read_text().splitlines() if line.strip()]
    banned = {"hash table", "seasons", "detective", "refrigerator", "weather", "climate and", "the sea", "sleep",
              "photosynthesis", "exercise", "a bill", "machine learning", "vaccine", "breakfast", "hiking",
              "list and a tuple", "emails"}
    seen = set(exclude)
    kept = []
    for g, p in prompts:
        if p in bench or p in seen or any(b in p.lower() for b in banned):
            continue
        seen.add(p)
        kept.append((g, p))
    random.Random(0).shuffle(kept)
    with open(out, "w") as f:
        for i, (g, p) in enumerate(kept):
            f.write(json.dumps({"source": f"chat-{g}", "id": i, "prompt": p}) + "\n")
    print(f"{len(kept)} prompts ({len(prompts) - len(kept)} held out or repeated) -> {out}")
    return [p for _, p in kept]


def main() -> None:
    first = _write(_expand((
        ("concept", _items(CONCEPTS), CONCEPT_TEMPLATES),
        ("howto", _items(TASKS), TASK_TEMPLATES),
        ("creative", _items(THINGS), THING_TEMPLATES),
        ("compare", _items(PAIRS), PAIR_TEMPLATES),
        ("device", _items(DEVICES), DEVICE_TEMPLATES),
        ("code-task", _items(CODE_TASKS), CODE_TASK_TEMPLATES),
        ("code-stdlib", _stdlib_functions(), CODE_TEMPLATES),
    )), OUT)
    concepts = _items(CONCEPTS) + _items(CONCEPTS_2)
    _write(_expand((
        ("concept", concepts, CONCEPT_TEMPLATES_2),
        ("concept", _items(CONCEPTS_2), CONCEPT_TEMPLATES),
        ("howto", _items(TASKS) + _items(TASKS_2), TASK_TEMPLATES_2),
        ("howto", _items(TASKS_2), TASK_TEMPLATES),
        ("creative", _items(THINGS) + _items(THINGS_2), THING_TEMPLATES_2),
        ("creative", _items(THINGS_2), THING_TEMPLATES),
        ("code-task", _items(CODE_TASKS) + _items(CODE_TASKS_2), CODE_TASK_TEMPLATES_2),
        ("code-task", _items(CODE_TASKS_2), CODE_TASK_TEMPLATES),
    )), OUT2, exclude=set(first))


if __name__ == "__main__":
    main()
