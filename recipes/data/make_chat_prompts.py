"""Write recipes/data/chat_prompts.jsonl, chat_prompts_2.jsonl, chat_prompts_3.jsonl and chat_prompts_4.jsonl:
general chat, explanation and code prompts for `sdlm distill`.

The GSM8K/MBPP corpus teaches the drafts math and code answers only. These prompts widen it with
the other kinds of request a chat model gets: explanations, how-tos, comparisons, short creative
writing and questions about Python's standard library. They are built offline from templates and
topic lists (below) and from the standard library itself, so the file is reproducible:

    python recipes/data/make_chat_prompts.py

The first file (3345 prompts) made the answers of the stage-2 corpus; the second ("round 2") adds new
phrasings of the same topics and new topics, never a prompt of the first file. The third ("round 3")
adds new kinds of everyday request (definitions, why-questions, short emails and messages, pros and cons, plans,
advice under a budget or time limit, Python errors, SQL and shell basics, new creative forms), never a prompt of
the first two files.
The fourth ("round 4") adds more new kinds (explanations for a child or with an analogy, common mistakes, summaries
of short passages, notes turned into a list or an email, sorting a given list, short factual questions, step-by-step
instructions, dialogues and role-play, limericks, slogans, riddles, product descriptions, maths words, JavaScript,
shell and git basics, new Python tasks), never a prompt of the first three files.

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
OUT3 = HERE / "chat_prompts_3.jsonl"
OUT4 = HERE / "chat_prompts_4.jsonl"
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


# round 3: new kinds of everyday request (definitions, why-questions, short messages, pros and cons, plans,
# constraints, Python errors, SQL and shell basics, new creative forms) and new phrasings of the topics above
PAIRS_3 = """
a cold and the flu; jam and jelly; a violin and a viola; a guitar and a ukulele; a moth and a butterfly;
a bee and a wasp; a turtle and a tortoise; a seal and a sea lion; a dolphin and a porpoise; a llama and an alpaca;
a leopard and a cheetah; an ape and a monkey; a rat and a mouse; a raven and a crow; a herb and a spice;
a soup and a stew; a latte and a cappuccino; green tea and black tea; butter and margarine; a lemon and a lime;
a sweet potato and a yam; a cupcake and a muffin; an omelette and a frittata; a kayak and a canoe;
a museum and a gallery; a novel and a novella; a biography and an autobiography; fiction and nonfiction;
a dialect and a language; a debit card and a credit card; a savings account and a checking account;
a salary and a wage; gross income and net income; a recession and a depression; a manager and a leader;
a mentor and a coach; a job and a career; a psychologist and a psychiatrist; a sprain and a strain;
fog and mist; hail and sleet; a river and a stream; a hill and a mountain; a pond and a lake;
an island and a peninsula; a planet and a dwarf planet; a solar eclipse and a lunar eclipse;
a galaxy and a solar system; a laptop and a tablet; an app and a website; a file and a folder;
a URL and a domain name; an IP address and a MAC address; Wi-Fi and Bluetooth; an SSD and a hard drive;
a computer virus and a computer worm; a bit and a byte; a library and a framework; an API and an SDK;
SQL and NoSQL databases; a process and a thread; concurrency and parallelism; `==` and `is` in Python;
`append` and `extend` in Python; `sort()` and `sorted()` in Python; a module and a package in Python;
`break` and `continue` in Python; a syntax error and a runtime error; an argument and a parameter;
a local variable and a global variable; static typing and dynamic typing; unit tests and integration tests;
Git and GitHub; a commit and a push in Git; a branch and a fork; empathy and sympathy; affect and effect;
fewer and less; who and whom; borrow and lend; a colon and a semicolon; a prefix and a suffix;
a synonym and an antonym; an adjective and an adverb; a president and a prime minister; a patent and a copyright;
a misdemeanor and a felony; a lease and a mortgage; a warranty and a guarantee; a podcast and a radio show;
a marathon and a half marathon; jogging and running; a yacht and a sailboat; a cyclone and a typhoon
"""
PAIR_TEMPLATES_3 = [
    "What is the difference between {x}?",
    "How are {x} different from each other?",
    "Explain the difference between {x} in simple terms.",
]
FACTS_3 = """
giraffes; hedgehogs; kangaroos; jellyfish; tigers; pandas; camels; hummingbirds; crows; parrots; bats; squirrels;
sloths; axolotls; seahorses; koalas; flamingos; turtles; snails; earthworms; goldfish; lions; cheetahs; gorillas;
the Eiffel Tower; the Great Wall of China; the pyramids of Giza; Mount Everest; the Grand Canyon; Venice; Iceland;
Japan; Australia; Canada; the Pacific Ocean; the Alps; Saturn; Venus; Neptune; Pluto; the human eye;
the human tongue; fingerprints; teeth; hair; coins; paper; glass; pencils; chess pieces; playing cards; the piano
keyboard; lighthouses; castles; libraries of the ancient world; the Vikings; the Aztecs; ancient Greece;
the Statue of Liberty; the Colosseum; the Taj Mahal; bananas; potatoes; apples; honeybees; maple syrup; popcorn;
owls; peacocks; polar bears; snow leopards; orcas; ladybugs; chameleons; the Amazon rainforest; New Zealand;
Egypt's pharaohs; the London Underground; the Moon's surface; the human skeleton; bicycles; umbrellas
"""
FACT_TEMPLATES_3 = [
    "Give me five fun facts about {x}.",
    "Tell me three things most people don't know about {x}.",
    "What are some surprising facts about {x}?",
]
IDEAS_3 = """
a rainy Sunday afternoon; a cheap date night; a birthday gift for my mother; a school science project;
a family game night; a name for a new bakery; a team-building activity at work; a vegetarian dinner; a picnic menu;
a small balcony garden; a first blog post; a Halloween costume; a theme for a kids' party; a weekend hobby;
a short story for children; a photo project; a New Year's resolution; a fun lesson about fractions;
an anniversary surprise; a healthy lunch to take to work; a podcast episode; a gift for a coworker who is retiring;
a message for a Mother's Day card; a quick weeknight dinner; celebrating a friend's promotion;
a fundraiser for a local school; a group activity for a book club; a YouTube channel about cooking;
an icebreaker for a meeting; a science activity for kids at home; snacks for a movie night; a theme for a wedding;
a cozy reading corner; a new family tradition; a small business I could start from home; a volunteer project;
a community event; a thank-you gift for a teacher; a short weekend getaway; learning new vocabulary in a fun way;
a dessert without added sugar; a houseplant for a dark room; a character in a fantasy novel;
a logo for a coffee shop; a slogan for a bike shop; a snowy day with kids; a garden party; a road trip playlist;
a fun Friday at the office; a themed dinner party; a school talent show act; a small kitchen makeover;
a walking tour of my town; a gift for a new neighbor; a first date conversation; a family photo shoot;
a short film with friends; a cheap summer activity for teenagers
"""
IDEA_TEMPLATES_3 = ["Give me three ideas for {x}.", "Suggest five ideas for {x}."]
TIPS_3 = """
a first day at a new job; moving to a new city; living with roommates; writing a good résumé;
a long car trip with kids; a job interview over video; taking notes in class; running a first marathon;
learning to drive; staying calm in traffic; buying a used bicycle; shopping at a farmers' market;
hosting guests for the holidays; visiting a museum with children; taking care of a new puppy; cooking for one person;
decluttering a small apartment; working at a standing desk; traveling with only a carry-on bag;
talking to a shy child; starting at a new school; making small talk at a party; keeping a long-distance friendship;
reading a difficult book; painting with watercolors; taking portraits of friends; growing herbs on a windowsill;
camping for the first time; cycling safely in the city; using public transport in a new city;
saving for a big purchase; negotiating the price of a car; writing a wedding speech; staying organized at work;
answering tough interview questions; learning a musical instrument as an adult; packing lunches for school;
running a garage sale; leading a book club; teaching a class for the first time; going back to school as an adult;
writing a short story; choosing a ripe watermelon; caring for leather shoes; keeping cut flowers fresh;
staying warm at home in winter; reading nutrition labels; working in a noisy office; sharing a kitchen;
giving a toast at a dinner; writing a birthday card; flying with a baby; keeping a plant alive in an office;
making a good cup of coffee; driving at night; organizing a small pantry; writing a polite complaint letter;
calming a crying baby; speaking up in meetings
"""
TIP_TEMPLATES_3 = ["Give me five tips for {x}.", "What are your best tips for {x}?"]
PROS_CONS_3 = """
working from home; living in a big city; living in the countryside; buying a used car; renting instead of buying a
home; owning an electric car; taking a gap year; learning online; studying abroad; having a dog; freelancing;
a four-day work week; social media for teenagers; a standing desk; buying food in bulk; cooking at home;
paying with cash; giving a child a smartphone; homeschooling; living alone; open-plan offices;
e-books compared with paper books; gas stoves; solar panels on a house; nuclear power; self-driving cars;
fast fashion; tiny houses; being self-employed; joining a gym; school uniforms; online shopping; streaming music;
early retirement; minimalism; a vegetarian diet; a big wedding; living near family; moving abroad;
raising a child with two languages; taking out a student loan; using a password manager; smart home devices;
buying a house with a friend; leasing a car; remote meetings; having a side job; living in a small town;
wind farms; online classes for children; wearing a smartwatch; renting a car on holiday; shared bank accounts;
buying a new phone every year; working night shifts; adopting an older dog; living on a boat; flying compared
with taking the train
"""
PROS_CONS_TEMPLATES_3 = ["List the pros and cons of {x}.", "What are the advantages and disadvantages of {x}?"]
WORDS_3 = """
serendipity; nostalgia; ambiguous; resilient; meticulous; candid; pragmatic; eloquent; frugal; diligent;
gregarious; ubiquitous; ephemeral; benevolent; skeptical; whimsical; tenacious; humble; optimistic; nuance;
irony; sarcasm; paradox; cliché; euphemism; idiom; jargon; etiquette; hospitality; integrity; compromise;
consensus; bias; dilemma; wanderlust; zeitgeist; déjà vu; schadenfreude; bittersweet; mundane; quaint; vivid;
subtle; tedious; lethargic; reluctant; inevitable; spontaneous; sustainable; authentic; vulnerable; ambitious;
conscientious; altruism; apathy; anecdote; analogy; hyperbole; satire; trivia; rhetoric; cynical; naive; stoic;
eccentric; mediocre; procrastinate; empathize; ponder; thrive; cherish; linger; meander; scrutinize;
gullible; resourceful; versatile; obsolete; tactful; persuade; reconcile; mitigate; advocate; hinder;
leisure; solitude; courtesy; hindsight; foresight; kudos; fiasco; hustle; savvy; wholesome
"""
WORD_TEMPLATES_3 = [
    "What does the word {x} mean?",
    "Use the word {x} in two example sentences.",
    "Explain the word {x} and give a synonym.",
]
TERMS_3 = """
bandwidth; latency; cache; firmware; malware; firewall; VPN; two-factor authentication; browser extension;
software update; pixel density; time complexity; refactoring; technical debt; deployment;
backend; frontend; pull request; syntax; runtime; bytecode; virtual machine;
software container; dependency; open-source license; user interface; user experience; prototype;
opportunity cost; interest rate; dividend; net worth; gross domestic product; liquidity; diversification;
depreciation; budget deficit; emergency fund; down payment; credit limit; pension; tax deduction;
entropy; osmosis; catalyst; half-life; wavelength; inertia; momentum; biodiversity; carbon footprint;
ecosystem; food chain; habitat; symbiosis; mutation; enzyme; calorie; gluten; antioxidant;
burnout; work-life balance; mindfulness; gig economy; fair trade; carbon offset; peer pressure;
growth mindset; impostor syndrome; confirmation bias; placebo; deadline; stakeholder; key performance
indicator; mission statement; brand; niche market; bottleneck; feedback loop; rule of thumb; spam filter;
screenshot; QR code reader; operating system update; search algorithm; invoice; receipt;
subscription; loyalty program; compound growth; side hustle; carbon tax; heat wave; food desert;
supply chain; minimum wage; trade deficit; startup; venture capitalist; angel investor
"""
TERM_TEMPLATES_3 = [
    "What does the term {x} mean?",
    "Give a one-sentence definition of the term {x}.",
    "Explain the term {x} with a simple example.",
]
WHY_3 = """
cats purr; bread goes stale; onions make people cry; the sky is blue; leaves change color in autumn;
ice floats on water; we get goosebumps; we yawn; our fingers wrinkle in the bath; popcorn pops;
the ocean is salty; dogs wag their tails; cats usually land on their feet; we get hiccups;
metal feels colder than wood; soap removes grease; soap bubbles are round; stars twinkle;
planes leave white trails in the sky; cut apples turn brown; milk goes sour; coffee keeps people awake;
hair turns gray with age; our voices sound different on recordings; cold ice cream gives us brain freeze;
spicy food feels hot; mosquitoes bite some people more than others; zebras have stripes; flamingos are pink;
birds fly in a V shape; giraffes have long necks; bees make honey; moths fly toward lights; fireflies glow;
snakes shed their skin; some trees lose their leaves in winter; rivers curve; sunsets are red and orange;
we see lightning before we hear thunder; snowflakes have six sides; water boils at a lower temperature in the
mountains; salt melts ice on roads; a spoon looks bent in a glass of water; our ears pop on an airplane;
we blink; we cannot tickle ourselves; knuckles crack; our stomachs growl when we are hungry; we sneeze;
muscles get sore after a hard workout; bruises change color; healing wounds itch; the Leaning Tower of Pisa leans;
English spelling is so irregular; a week has seven days; phone batteries wear out over time;
computers slow down as they get older; cold glasses get wet on the outside on a hot day; old books smell sweet;
some cheeses have holes; bananas turn brown; hot air rises; dogs sniff everything; cats knead soft blankets;
the Moon looks bigger near the horizon; garlic smells so strong; heavy ships float; some animals hibernate;
airplanes fly so high; tomatoes count as fruit; dogs have wet noses; teenagers' voices crack;
time seems to pass faster as we get older; some people get motion sickness; we shiver when we are cold;
cities are warmer than the countryside; we get sunburned; people have different blood types;
a moving bicycle stays upright; golf balls have dimples; car tires have treads; some songs get stuck in our heads;
cats dislike water; chili peppers are hot; carrots are orange; pineapples sting the tongue; nuts go rancid;
a kettle whistles; microwaved food heats unevenly; glass is transparent; rubber bounces; magnets stick to some metals
"""
WHY_TEMPLATES_3 = ["Explain why {x}.", "Can you tell me why {x}?"]
WHY_QUESTIONS_3 = """
do cats purr; does bread go stale; do onions make people cry; is the sky blue; do leaves change color in autumn;
does ice float on water; do we get goosebumps; do we yawn; do our fingers wrinkle in the bath; does popcorn pop;
is the ocean salty; do dogs wag their tails; do we get hiccups; does metal feel colder than wood; do stars twinkle;
do cut apples turn brown; does milk go sour; does hair turn gray with age; do our voices sound different on
recordings; does spicy food feel hot; do zebras have stripes; are flamingos pink; do birds fly in a V shape;
do giraffes have long necks; do bees make honey; do moths fly toward lights; do fireflies glow;
do snakes shed their skin; are sunsets red and orange; do we see lightning before we hear thunder;
does salt melt ice on roads; does a spoon look bent in a glass of water; do our ears pop on an airplane; do we blink;
do knuckles crack; does my stomach growl when I am hungry; do we sneeze; do muscles get sore after a hard workout;
do bruises change color; do healing wounds itch; does the Leaning Tower of Pisa lean; does a week have seven days;
do phone batteries wear out over time; do bananas turn brown; does hot air rise; do dogs sniff everything;
does the Moon look bigger near the horizon; do heavy ships float; do some animals hibernate; do dogs have wet noses;
do we shiver when we are cold; do golf balls have dimples; do songs get stuck in our heads; are chili peppers hot;
are carrots orange; does a kettle whistle; does rubber bounce; does the Moon have craters; do volcanoes erupt;
do deserts get cold at night; is Venus so hot; does Mars look red; is the Earth round; do we have leap years;
are shadows longer in the evening; is a rainbow curved; is wet sand darker than dry sand; does bread rise;
do cakes sink in the middle; does iron rust; are leaves green; do roses have thorns; do trees have rings;
do birds sing in the morning; do dogs tilt their heads; do cows have four stomachs; do camels have humps;
do owls hoot at night; do ducks stay dry in water; does time seem to pass faster as we get older;
do some people get motion sickness; do we get sunburned; do cats knead soft blankets; does garlic smell so strong;
does soap remove grease
"""
WHY_QUESTION_TEMPLATES_3 = ["Why {x}?", "Why {x}? Please explain it simply."]
MESSAGES_3 = """
my landlord asking for a leaking tap to be fixed; my manager asking for a day off next Friday;
a teacher asking for an extension on an assignment; a neighbor asking them to keep the noise down at night;
a colleague thanking them for their help on a project; a client to move our meeting to next week;
a shop about a late delivery; a hotel asking about early check-in; a restaurant to book a table for eight;
my child's school explaining an absence; a recruiter to follow up after an interview; a company declining a job offer;
a professor asking for a letter of recommendation; a gym to cancel my membership;
a shop asking for a refund for a broken kettle; my team announcing that I am leaving the company;
a new colleague to welcome them to the team; a speaker to thank them for their talk;
a dentist's office to change an appointment; a plumber asking for a price estimate;
an author to say that I enjoyed their book; my bank about a charge I do not recognize;
a library asking to renew a book; a local charity offering to volunteer; a coworker asking them to review my report;
my family about plans for a reunion; a classmate to plan a group project; a seller asking if an item is still
available; an airline about lost luggage; my landlord giving notice that I am moving out;
the organizer of an event to say that I cannot attend; a former teacher asking for career advice;
my boss asking to work from home on Fridays; a new client to introduce myself; a supplier about a delayed order;
a friend congratulating them on a new job; a neighbor thanking them for watering my plants;
a teacher thanking them at the end of the school year; a colleague apologizing for missing a meeting;
my team reminding them of a deadline on Friday; the city council about a broken streetlight;
a tutor asking about lessons for my son; a museum asking about group tours; a garage asking about the cost of a repair;
my internet provider about a slow connection; a friend to invite them to dinner on Saturday;
a babysitter to confirm the time for Saturday evening; a volunteer thanking them for their time;
a colleague asking to swap shifts next week; a landlord asking if I may keep a cat; a coach to say that my daughter
will miss practice; a customer to thank them for their order; a host to thank them for a lovely evening;
an old manager asking for a reference; a club to ask how to join; a neighbor to introduce myself;
a hairdresser to book an appointment; a teacher asking how my son is doing in class
"""
MESSAGE_TEMPLATES_3 = [
    "Write a short, polite email to {x}.",
    "Write a short message to {x}.",
    "Help me write a brief note to {x}.",
]
WRITING_3 = """
a short toast for my sister's wedding; a two-sentence description of a reusable water bottle;
a friendly reminder about tomorrow's team meeting; a short bio for my profile on a work website;
a thank-you card for a birthday present; a short speech to welcome new students; an out-of-office reply;
a short announcement for a lost cat poster; a one-paragraph review of a local café; a short invitation to a
housewarming party; a polite reply turning down an invitation; a short note to leave for a house sitter;
a two-line greeting for a holiday card; a short introduction of myself for the first day of a class;
a short product description for handmade candles; a short apology to a customer for a delayed order;
a short rule list for a shared kitchen; a short welcome message for a community garden group;
a farewell card message for a coworker; a short description of my small bakery for its website;
a friendly sign asking visitors to take their shoes off; a short request for feedback after a workshop;
a one-paragraph summary of why I want to volunteer at an animal shelter; a short speech for a retirement party;
a short description for a used bicycle I want to sell; a short motivational message for a team before a big launch;
a short letter to my future self; a short condolence message for a friend; a text message to cancel plans politely;
a short note to thank a nurse
"""
WRITING_TEMPLATES_3 = ["Write {x}.", "Can you help me write {x}?"]
BUDGET_3 = """
decorate my bedroom; eat healthily; travel around Europe; throw a birthday party; furnish my first apartment;
stay fit; learn to paint; plan a wedding; have fun on a weekend; dress well for work; start a new hobby;
go on a nice date; make my garden look nice; feed a family of four; celebrate an anniversary;
keep my kids entertained in the summer; improve my home office; start a small business; take up photography;
learn to play an instrument; update my bathroom; keep my home warm in winter; host a holiday party;
go camping; buy gifts for friends; set up a home gym; visit a big city; learn a new language; enjoy a day out with
children; make my kitchen look new
"""
BUDGET_TEMPLATES_3 = ["How can I {x} on a small budget?", "What are some cheap ways to {x}?"]
TEN_MINUTES_3 = """
learn a new language; get stronger; improve my drawing; keep my house clean; learn to meditate; read more;
practice the piano; learn to code; improve my writing; stay in touch with friends; learn about history;
get more flexible; reduce stress; practice gratitude; improve my posture; get better at chess;
study for an exam; learn to knit; get better at mental math; grow my vocabulary; keep my garden tidy;
plan healthy meals; keep up with the news; improve my typing speed; practice a speech; work on a side project;
learn basic Spanish; get my finances in order; learn to sing; declutter my home
"""
TEN_MINUTES_TEMPLATES_3 = [
    "How can I {x} if I only have 10 minutes a day?",
    "I only have 15 minutes a day. How can I {x}?",
]
PLANS_3 = """
a relaxing weekend at home; a productive Monday morning; learning to cook in one month; a week of vegetarian
dinners; a first visit to Paris; a child's birthday party; cleaning my whole house in a weekend; saving for a holiday;
reading twelve books in a year; training for a five-kilometer run; moving to a new apartment;
learning to draw in three months; a family reunion; a weekly study group; a garage sale; a rainy day with kids;
spring cleaning; a monthly budget for a student; getting back in shape after a long break;
learning Python in eight weeks; writing a short novel; decluttering my home; starting a vegetable garden;
a surprise party for a friend; a three-day trip to Rome; a calm evening routine; getting ready for a new baby;
a weekly cleaning schedule; a charity bake sale; a morning routine before work; a school science fair project;
a team's first week with a new colleague; a day in London with teenagers; preparing for a driving test
"""
PLAN_TEMPLATES_3 = ["Suggest a plan for {x}.", "Help me make a simple plan for {x}."]
PY_ERRORS_3 = """
`IndexError: list index out of range`; `KeyError`; `TypeError: 'int' object is not iterable`;
`TypeError: can only concatenate str (not "int") to str`; `NameError: name 'x' is not defined`;
`AttributeError: 'NoneType' object has no attribute 'append'`; `ValueError: invalid literal for int() with base 10`;
`ZeroDivisionError: division by zero`; `IndentationError: unexpected indent`; `SyntaxError: invalid syntax`;
`ModuleNotFoundError: No module named 'requests'`; `ImportError: cannot import name`;
`FileNotFoundError: [Errno 2] No such file or directory`; `RecursionError: maximum recursion depth exceeded`;
`UnboundLocalError: local variable referenced before assignment`;
`TypeError: 'str' object does not support item assignment`; `TypeError: unhashable type: 'list'`;
`TypeError: missing 1 required positional argument`; `TypeError: 'NoneType' object is not subscriptable`;
`RuntimeError: dictionary changed size during iteration`; `UnicodeDecodeError: 'utf-8' codec can't decode byte`;
`PermissionError: [Errno 13] Permission denied`; `OverflowError: math range error`; `AssertionError`;
`TabError: inconsistent use of tabs and spaces in indentation`; `TypeError: object of type 'int' has no len()`;
`AttributeError: 'str' object has no attribute 'append'`; `ValueError: too many values to unpack`;
`IndexError: string index out of range`; `TypeError: list indices must be integers or slices, not str`;
`json.decoder.JSONDecodeError: Expecting value`; `ValueError: math domain error`;
`TypeError: 'list' object is not callable`; `SyntaxError: unterminated string literal`; `StopIteration`
"""
PY_ERROR_TEMPLATES_3 = [
    "What does the Python error {x} mean and how do I fix it?",
    "I got {x} in my Python code. What causes it?",
    "How do I avoid {x} in Python?",
]
PY_CONCEPTS_3 = """
list comprehensions; dictionary comprehensions; set comprehensions; generator expressions; generators;
the `yield` keyword; decorators; f-strings; exceptions; custom exceptions; `try`, `except` and `finally`;
context managers; the `with` statement; lambda functions; `*args` and `**kwargs`; default arguments;
keyword arguments; type hints; dataclasses; properties; class methods; static methods; inheritance;
the `__init__` method; the `__repr__` method; magic methods; iterators; slicing; multiple assignment;
the walrus operator; `enumerate`; `zip`; `map` and `filter`; the `global` keyword; closures; modules and imports;
virtual environments; `if __name__ == "__main__"`; string formatting; mutable and immutable types; `None`;
sets; `collections.Counter`; enums; abstract base classes; the `assert` statement; chained comparisons;
`async` and `await`; threads; the `match` statement; `sorted` with a `key` function; `any` and `all`;
`isinstance`; docstrings; the `pass` statement; `else` on a loop
"""
PY_CONCEPT_TEMPLATES_3 = [
    "Explain {x} in Python with an example.",
    "Give a short example of {x} in Python and explain it.",
    "When should I use {x} in Python?",
]
CODE_TASKS_3 = """
parse a date string like 2024-05-01; read a JSON file and print one field; save a dictionary to a JSON file;
rename all files in a folder; list all files with a given extension; find the longest word in a sentence;
convert a string to title case; check that a password has a digit and an uppercase letter;
generate a random password; simulate rolling two dice; make a number guessing game; make a to-do list for the
terminal; convert minutes to hours and minutes; convert kilometers to miles; compute the area of a circle;
print a multiplication table; print a triangle of stars; ask for the user's name and greet them;
count how often a letter appears in a word; turn a list of names into a numbered list; remove empty strings from a
list; group words by their first letter; find the oldest person in a list of dictionaries;
compute a running total of a list; round a number to two decimal places; format a number with thousands separators;
pad a number with leading zeros; print the current time; count the days between two dates; check whether a file
exists; create a folder if it does not exist; copy a file; print the lines of a file in reverse order;
replace a word in a text file; count the unique words in a text; make a simple stopwatch;
make a tiny calculator that reads two numbers and an operator; make a simple countdown timer;
keep a shopping list in a class; print a simple progress bar
"""
CODE_TASK_TEMPLATES_3 = ["Write a small Python program to {x}.", "Can you write Python code to {x}? Keep it short."]
SQL_3 = """
select all rows from a table; select only some columns; filter rows with a WHERE clause; sort results by a column;
count the rows in a table; find the average value of a column; group rows and count each group; join two tables;
find rows with missing values; insert a new row; update a row; delete rows that match a condition; create a table;
add a column to an existing table; find duplicate rows; select the first 10 rows; rename a column in a query result;
combine the results of two queries; find the maximum value in each group; filter groups with HAVING;
find text that starts with a given word; select rows between two dates; remove duplicate values from a result;
create an index; find the rows above the average with a subquery
"""
SQL_TEMPLATES_3 = ["How do I {x} in SQL?", "Write an SQL query to {x}, and explain it."]
SQL_TERMS_3 = """
a primary key; a foreign key; an index; a view; a transaction; a NULL value; an inner join; a left join;
normalization; a schema; an aggregate function; a stored procedure
"""
SQL_TERM_TEMPLATES_3 = ["What is {x} in SQL?", "Explain {x} in SQL with an example."]
SHELL_3 = """
`ls -la`; `cd ..`; `pwd`; `mkdir -p`; `rm -rf`; `cp -r`; `mv`; `cat`; `less`; `head -n 20`; `tail -f`;
`grep -r`; `find . -name "*.txt"`; `wc -l`; `sort | uniq -c`; `chmod +x`; `chown`; `ps aux`; `kill`; `top`;
`df -h`; `du -sh`; `tar -xzf`; `curl`; `wget`; `ssh`; `scp`; `echo $PATH`; `export`; `which python`; `history`;
`man`; `touch`; `ln -s`; `sudo`; `xargs`; `sed 's/old/new/g'`; `awk '{print $1}'`; `diff`; `cut -d, -f1`
"""
SHELL_TEMPLATES_3 = ["What does the shell command {x} do?", "Explain the command {x} with an example."]
SHELL_TASKS_3 = """
find large files; count the lines in a file; search for a word in many files; rename many files at once;
see which process is using a port; check free disk space; unzip a file; make a script executable; list hidden files;
go back to the previous folder; see the last lines of a log file; compare two files; download a file;
create a new folder; move a file to another folder; delete an empty folder; show the current date and time;
find where a program is installed; run a command in the background; save a command's output to a file
"""
SHELL_TASK_TEMPLATES_3 = ["How do I {x} from the command line?", "What is the shell command to {x}?"]
SCENES_3 = """
a farmers' market on a Saturday morning; a campfire at night; a kitchen on a holiday morning;
a crowded train at rush hour; a quiet forest after rain; a county fair; a bakery at closing time;
a snowy mountain cabin; a summer storm in the city; a spice market; a school cafeteria at lunch; an old bookshop;
a football stadium on match day; a busy airport; a night market; a field of sunflowers; an orchard in autumn;
a rooftop garden; a fishing harbor at dawn; a jazz club; a grandmother's kitchen; a candlelit dinner;
a playground in the afternoon; a ski slope; a lavender field; a pine forest in winter;
a coffee shop on a rainy morning; a carnival at night; a chocolate factory; a greenhouse; a flower shop;
a busy restaurant kitchen; a train platform in the fog; a small island harbor; a picnic in the park;
a cinema before the film starts; a street parade; a bustling fish market; a barn on a cold morning; a hot spring;
a music festival at sunset; a cozy attic; an autumn fair; a bus stop in the rain; a desert road at noon;
a quiet temple; a bakery on a winter morning; an ice rink; a vineyard at harvest time; a market in Morocco
"""
SCENE_TEMPLATES_3 = [
    "Describe {x} using all five senses.",
    "Write a short descriptive paragraph about {x}.",
    "Write a short poem about {x}.",
]
CHARACTERS_3 = """
a cat who wants to be a chef; a penguin who hates the cold; a forgetful wizard; a snail in a hurry;
a robot who learns to laugh; a grumpy old goat; a shy giraffe; a dog who delivers the mail; a cloud that cannot rain;
a pirate who is afraid of water; a bear who loves honey cake; a clumsy knight; a mouse who wants to fly;
a tortoise who runs a café; a crow who collects buttons; a little star that falls to Earth;
a baker who bakes too much bread; a squirrel who forgets where it hid its nuts; an elephant who is afraid of mice;
a ghost who is afraid of the dark; a dragon who cannot breathe fire; a king with a very long beard;
a goldfish with big dreams; a lazy lion; a talkative teapot; a hedgehog looking for a friend;
a puppy on its first day at the park; a scarecrow who befriends the crows; a frog who wants to sing opera;
a moose in the city; a sock that lost its pair; a chef who cannot taste; a tiny dinosaur; a rabbit who is always late;
an ant who wants a holiday; a clock that runs backwards; a spider who weaves pictures; a kangaroo with an empty pouch
"""
CHARACTER_TEMPLATES_3 = [
    "Write a limerick about {x}.",
    "Write a short story about {x}.",
    "Write a short fable about {x}, with a moral at the end.",
]
WHY_MORE_3 = """
the Moon has craters; volcanoes erupt; deserts get cold at night; Venus is so hot; Mars looks red; the Earth is round;
we have a leap year every four years; shadows are longer in the evening; a rainbow is curved; thunder rumbles;
a seashell seems to make a rushing sound; wet sand is darker than dry sand; our breath is visible on cold days;
eggs harden when they are boiled; sugar dissolves faster in hot tea; bread rises; cakes sink in the middle;
ice cubes are cloudy in the middle; candles drip; paper turns yellow with age; pennies turn green; iron rusts;
leaves are green; roses have thorns; cacti have spines; trees have rings; grass grows back after it is cut;
birds sing in the morning; cats bring their owners dead mice; dogs tilt their heads; horses wear shoes;
cows have four stomachs; camels have humps; penguins cannot fly; owls hoot at night; ducks stay dry in water
"""
RECOMMEND_3 = """
board games for a family with young kids; classic novels for a teenager; houseplants that are hard to kill;
easy recipes for a beginner cook; podcasts about history; card games for two players; hobbies for someone who
works from home; indoor activities for a rainy day; outdoor games for a children's party; books about space for a
ten-year-old; songs for a road trip; gifts for someone who loves gardening; apps for learning a language;
simple science experiments for kids; books to improve my writing; strategy games for beginners;
films for a family movie night; ways to relax after work; quiet hobbies for an evening at home;
herbs that are easy to grow; weekend activities for couples; easy instruments to learn as an adult;
beginner projects for learning Python; puzzles to keep my mind sharp; snacks for a long car trip;
dishes to bring to a potluck; flowers that attract butterflies; pets for a small apartment;
books for someone who wants to start cooking; games to play with friends online
"""
RECOMMEND_TEMPLATES_3 = ["Can you recommend some {x}?", "Suggest a few {x}, with a short reason for each."]
POLITE_3 = """
Send me the report now.; I need your answer today.; You did this wrong.; Stop calling me after work.;
Move your car.; I don't like your idea.; Give me a refund.; Your music is too loud.; I can't come to your party.;
This food is cold.; You are late again.; Clean up your mess.; I want a different room.; Answer my question.;
Don't touch my things.; Fix my computer.; Tell me why the order is late.; I won't do that task.;
Your report has too many mistakes.; I need more time.; Pay me back the money.; That meeting was a waste of time.;
I am not interested.; Call me back.; Where is my package?
"""
POLITE_TEMPLATES_3 = [
    "Rewrite this sentence so that it sounds more polite: \"{x}\"",
    "Make this message sound friendlier: \"{x}\"",
]
GRAMMAR_3 = """
Me and him went to the store yesterday.; She don't like apples.; Their going to the park later.;
I have went there many times.; The dog wagged it's tail.; Between you and I, the plan is bad.;
He runned very fast.; There is many reasons to stay.; Your the best friend I have.; I could of helped you.;
We was late for the bus.; The childs are playing outside.; She is more taller than her brother.;
I seen that movie last week.; Everyone have their own opinion.; He gave the book to my sister and I.;
Less people came than we expected.; I am agree with you.; She has lived here since five years.;
If I was you, I would call her.
"""
GRAMMAR_TEMPLATES_3 = ["Fix the grammar in this sentence: \"{x}\"", "What is wrong with this sentence? \"{x}\""]
PHRASES_3 = """
good morning; thank you very much; where is the train station; how much does this cost; I would like a coffee,
please; excuse me; nice to meet you; what time is it; can you help me; I don't understand; see you tomorrow;
happy birthday; where is the bathroom; the bill, please; I am lost; do you speak English; I love this city;
how are you; good night; I am sorry
"""
PHRASE_TEMPLATES_3 = ["How do you say \"{x}\" in Spanish?", "How do you say \"{x}\" in French?"]
MYTHS_3 = """
we only use 10 percent of our brains; goldfish have a three-second memory; lightning never strikes the same place
twice; bats are blind; the Great Wall of China can be seen from space; cracking your knuckles causes arthritis;
we lose most of our body heat through our heads; sugar makes children hyperactive; bulls hate the color red;
chameleons change color to blend in; ostriches bury their heads in the sand; you should wait an hour after eating
before swimming; shaving makes hair grow back thicker; reading in dim light damages your eyes; camels store water
in their humps; a penny dropped from a tall building could kill someone; humans have only five senses;
carrots help you see in the dark; dogs see only in black and white; touching a baby bird makes its mother reject it;
hair and nails keep growing after death; Napoleon was very short; the tongue has separate zones for each taste;
the Sun is yellow; people swallow spiders at night without noticing; mother birds abandon eggs that people touch;
cold temperatures give you a cold; blood is blue inside the body; water drains the other way in the southern
hemisphere; glass is a slow-moving liquid
"""
MYTH_TEMPLATES_3 = ["Is it true that {x}?", "Someone told me that {x}. Is that right?"]
CHOICES_3 = """
a laptop for school; running shoes; a first car; a good mattress; a houseplant for my office; a bicycle for
commuting; a tent for family camping; a backpack for travel; a phone plan; a winter coat; a good chef's knife;
a cutting board; a dog breed for a small apartment; a name for my new kitten; a university course; a piano teacher;
a dentist; a moving company; a health insurance plan; a savings account; a programming language to learn first;
a text editor for coding; a camera for beginners; a pair of glasses; a desk chair; a paint color for a bedroom;
a wedding venue; a book for a long flight; a gift for a ten-year-old; a vacuum cleaner; a holiday destination;
a board game for a group of friends; a font for a presentation; a laptop bag; a baby stroller; a kitchen table
"""
CHOICE_TEMPLATES_3 = ["What should I consider when choosing {x}?", "How do I choose {x}?"]
WHAT_IF_3 = """
you swallow chewing gum; you drink too much coffee; a bee stings you; you touch a jellyfish;
you leave milk out overnight; you put metal in a microwave; you mix bleach and vinegar; you never brush your teeth;
you forget to water a cactus; a plant gets no sunlight; you pour water on a grease fire; you eat a whole lemon;
a phone falls into water; you charge a phone all night; you stare at the Sun; you freeze bread;
you overwater a houseplant; you skip lunch every day; you heat a sealed can; you shake a soda bottle and open it;
you mix oil and water; you put salt in a glass of ice water; you leave a car in the sun all day;
you plant an apple seed; you boil an egg for an hour; you blow up a balloon too much; you never back up your laptop;
you stop using a muscle; you mix red and green light; you put a spoon in a glass of hot water
"""
WHAT_IF_TEMPLATES_3 = ["What happens if {x}?", "What happens if {x}? Explain it simply."]
IMAGINE_3 = """
the Moon disappeared; the Earth stopped spinning; all the bees disappeared; it never rained again;
the internet went down for a week; you fell into a black hole; all the ice at the North Pole melted;
people never needed to eat; everyone spoke the same language; the Sun were twice as big; there were no cars;
trees could walk; we had no electricity for a month; humans could breathe underwater; the Earth had two moons;
dinosaurs had never died out; nobody could lie; money did not exist; everyone could read minds; cats could talk
"""
IMAGINE_TEMPLATES_3 = ["What would happen if {x}?", "Imagine that {x}. What would change?"]
RECIPES_3 = """
guacamole; banana bread; a simple tomato sauce; hot chocolate; lemonade; fried rice; hummus;
a grilled cheese sandwich; a vegetable curry; mashed potatoes; a fruit salad; chocolate chip muffins;
a simple lentil soup; roasted vegetables; a chickpea salad; homemade pizza dough; apple crumble; iced tea;
scrambled tofu; a quick stir-fry; garlic bread; a tuna sandwich; a bean chili; pesto; a yogurt parfait;
potato wedges; a mug cake; a cucumber salad; popcorn on the stove; baked salmon; a simple risotto;
oatmeal cookies; vegetable soup; a caprese salad; a milkshake; roast chicken; a simple flatbread;
a cheese omelette; tomato soup; a peanut butter smoothie
"""
RECIPE_TEMPLATES_3 = ["How do I make {x}?", "Give me a simple recipe for {x}."]
PEOPLE_3 = """
Marie Curie; Albert Einstein; Isaac Newton; Charles Darwin; Leonardo da Vinci; William Shakespeare;
Ada Lovelace; Alan Turing; Nikola Tesla; Thomas Edison; Galileo Galilei; Cleopatra; Julius Caesar;
Napoleon Bonaparte; Abraham Lincoln; Nelson Mandela; Mahatma Gandhi; Martin Luther King Jr.; Rosa Parks;
Florence Nightingale; Amelia Earhart; Neil Armstrong; Yuri Gagarin; Wolfgang Amadeus Mozart;
Ludwig van Beethoven; Johann Sebastian Bach; Vincent van Gogh; Pablo Picasso; Frida Kahlo; Jane Austen;
Charles Dickens; Confucius; Aristotle; Plato; Socrates; Archimedes; Marco Polo; Christopher Columbus;
Queen Victoria; Genghis Khan; Louis Pasteur; Alexander Fleming; Gregor Mendel; Johannes Gutenberg;
Harriet Tubman; Grace Hopper; Rachel Carson; Mary Anning; Stephen Hawking; Carl Linnaeus
"""
PEOPLE_TEMPLATES_3 = ["Who was {x}?", "Why is {x} famous? Answer in a short paragraph."]
DEVICES_3 = """
a toaster; an electric kettle; an air conditioner; a smoke detector; a QR code; noise cancellation in headphones;
an induction cooktop; a pressure cooker; a heat pump; a hearing aid; a pacemaker; an electric toothbrush;
contactless payment; a traffic light; an escalator; a hot air balloon; a helicopter; a sailboat; a fire extinguisher;
a thermos flask; a sewing machine; a mechanical watch; a digital camera sensor; an e-reader screen; a dam;
a canal lock; a water tower; the gears of a bicycle; a car's braking system; an airbag; a fingerprint sensor;
face recognition on a phone; a USB cable; a metal detector; a coffee machine; a loudspeaker; a doorbell camera
"""
CONCEPT_TEMPLATES_3 = [
    "Give me five quick facts about {x}.",
    "Explain {x} in three sentences.",
    "Write a short quiz with three questions about {x}, and give the answers.",
]
TASK_TEMPLATES_3 = ["I want to {x}. What mistakes should I avoid?"]
OLD_PAIR_TEMPLATES_3 = ["How are {x} different from each other?"]
OLD_THING_TEMPLATES_3 = ["Write a limerick about {x}."]


# round 4: new kinds of everyday request (explanations for a child, in one paragraph or with an analogy, common
# mistakes, summaries of short passages, notes turned into a list or an email, sorting a given list, short factual
# questions, step-by-step instructions, dialogues and role-play, limericks, slogans, riddles, product descriptions,
# maths words, JavaScript, shell and git basics, new Python tasks) and new phrasings of the topics above
NEAR_BENCH_4 = ("email", "climate", "greenhouse", "immune", "hash", "artificial intelligence", "fitness", "awake",
                "yawn", "hibernate", "dreams", "laws")
CONCEPT_TEMPLATES_4 = [
    "Explain {x} to a young child, using simple words.",
    "Explain {x} in one paragraph.",
    "Explain {x} with an everyday analogy.",
    "What is the big idea behind {x}? Explain it with one real-life example.",
]
DEVICE_TEMPLATES_4 = ["Explain how {x} works to a child."]
PAIR_TEMPLATES_4 = ["Explain the difference between {x} using an analogy."]
WHY_TEMPLATES_4 = ["Explain to a child why {x}."]
TERM_TEMPLATES_4 = ["Explain the term {x} with an everyday analogy."]
FACT_TEMPLATES_4 = ["Write a short paragraph for children about {x}."]
PEOPLE_TEMPLATES_4 = ["Tell a child about {x} in a few simple sentences."]
WORD_TEMPLATES_4 = ["Explain the word {x} to a child, with an example sentence."]
MISTAKE_TEMPLATES_4 = [
    "What are the most common mistakes people make when they try to {x}?",
    "List the common mistakes to avoid if you want to {x}.",
]
PASSAGES_4 = """
The town library will close for two weeks in March while the roof is repaired. During that time, books can be
returned at the community center on Oak Street. Late fees will not be charged until the library reopens.;
Honeybees share news by dancing. A bee that has found flowers performs a "waggle dance" that tells the others the
direction and distance of the food. Scientists worked out the meaning of this dance in the twentieth century.;
Our company will switch to a new payroll system next month. Employees need to log in once before the 15th to
confirm their bank details. Anyone who has trouble should contact the HR team.;
The first bicycles, built in the early 1800s, had no pedals. Riders pushed themselves along with their feet.
Pedals and chains came decades later and made cycling much faster.;
Tomatoes were once thought to be poisonous in parts of Europe. They belong to the same plant family as deadly
nightshade. Today they are eaten all over the world, even though botanists call them fruits.;
Maria trained for six months to run her first half marathon. On race day it was hot and she had to walk part of
the way. She still finished, and she has already signed up for next year's race.;
The city plans to add 40 kilometers of protected bike lanes over the next three years. Officials say this will
make cycling safer and reduce traffic. Some shop owners worry about losing parking spaces.;
Octopuses have three hearts and blue blood. They can change the color and texture of their skin in a fraction of
a second. Many scientists consider them among the most intelligent animals without a backbone.;
The concert on Saturday has been moved from the park to the school hall. Tickets bought for the park are still
valid. Doors open at 6 p.m. and the music starts at 7.;
Regular backups protect your files from broken hardware, theft and mistakes. A good rule is to keep three copies
of important data on two kinds of storage, with one copy somewhere else. This is called the 3-2-1 rule.;
The Great Fire of London started in a bakery on Pudding Lane in 1666. It burned for four days and destroyed
thousands of homes. Surprisingly, only a few deaths were recorded.;
Ravi's bakery started as a stall at the Sunday market. His sourdough became so popular that he opened a small shop
two years later. He now employs six people and still bakes every morning himself.;
Coffee plants grow best in tropical highlands. The beans are really the seeds of a red fruit called a coffee
cherry. After the harvest, the seeds are dried, roasted and ground.;
Starting next Monday, the office kitchen will be cleaned every evening. Please wash your own mugs before you
leave. Dishes left in the sink will be put in a box by the door.;
Penguins live almost entirely in the Southern Hemisphere. Although they cannot fly, they are excellent swimmers
and use their wings as flippers. Emperor penguins can dive deeper than 500 meters.;
The museum's new dinosaur hall opens on 1 June. It includes a full Tyrannosaurus skeleton and a hands-on area for
children. Entry to the hall is free for museum members.;
Learning a second language can be slow at first. Many learners feel stuck after a few months, but steady practice
usually leads to a sudden jump in understanding. Patience matters more than talent.;
Venice is built on more than a hundred small islands in a lagoon. Instead of streets, many parts of the city have
canals, and people travel by boat. Rising water levels are a growing threat to the city.;
Our team missed the project deadline by a week. The main cause was a late change in requirements from the client.
Next time we will agree on how to handle changes before work begins.;
Paper was invented in China about two thousand years ago. The knowledge spread slowly along trade routes to the
Middle East and then to Europe. Before paper, people wrote on papyrus, parchment and bamboo.;
Tom bought a used car without having it checked by a mechanic. A month later the gearbox failed, and the repair
cost more than half of what he had paid. He now tells everyone to get an inspection first.;
Sloths move so slowly that tiny green algae grow on their fur. The green tint helps them hide in the trees. They
come down to the ground only about once a week.;
The school will hold its annual science fair on 12 April. Students in grades five to eight may enter alone or in
pairs. Projects must be registered with a teacher by 20 March.;
Compound interest means that you earn interest on your interest. Over many years, even small savings can grow a
lot. That is why starting to save early makes such a difference.;
The Eiffel Tower was built for the 1889 World's Fair in Paris. Many artists at the time called it ugly and wanted
it torn down. It is now the best-known symbol of France.;
Our neighborhood clean-up day is on Sunday at 9 a.m. We will meet at the playground and provide gloves and bags.
Bring water and wear sturdy shoes.;
Bamboo is one of the fastest-growing plants on Earth. Some kinds can grow almost a meter in a single day. It is
strong and light, so it is used for building in many parts of Asia.;
The new phone has a larger screen and a better camera than last year's model. However, the battery life is about
the same and the price has gone up. Reviewers say it is a good upgrade only for people with much older phones.;
Elena forgot her umbrella and got soaked on the way to her job interview. She laughed about it with the
interviewer, who had been caught in the same downpour that morning. She got the job.;
The Amazon River carries more water than any other river in the world. It flows through Peru, Colombia and Brazil
before it reaches the Atlantic Ocean. Thousands of kinds of fish live in it.;
Most phone chargers keep drawing a little power even when no phone is plugged in. Each one uses very little, but
together they add up. Unplugging chargers you are not using saves a bit of energy and money.;
Chess probably began in India around the sixth century. It spread to Persia and then to Europe, where the rules
slowly changed. The modern rules, with the powerful queen, date from about the fifteenth century.;
The bus company is changing the number 12 route from next month. Buses will no longer stop at the train station
but will go along Market Street instead. A new number 14 bus will serve the station every twenty minutes.;
Ants leave scent trails to guide other ants to food. The more ants use a trail, the stronger the scent becomes.
When the food runs out, the trail fades and the ants search elsewhere.;
Our book club read a novel about a family running a small hotel. Most members loved the characters but found the
ending rushed. We agreed to read something shorter next month.;
Glass is made mainly from sand heated to a very high temperature. When it cools, it becomes hard and clear. People
have been making glass for more than four thousand years.;
The hospital's visiting hours will change on 1 May. Visitors will be welcome from 10 a.m. to 8 p.m., and no more
than two people may visit a patient at the same time. Children under twelve must come with an adult.;
Kiwi birds cannot fly and are active mostly at night. They have nostrils at the tip of their long beaks, which
helps them smell worms underground. They are a national symbol of New Zealand.;
The printing press made books much cheaper. Before it, books were copied by hand and only the rich could afford
them. Within fifty years of its invention, millions of books had been printed in Europe.;
Sam wanted to learn the guitar but kept giving up after a week. This year he set a small goal of practicing for
ten minutes after dinner. Six months later, he can play a dozen songs.;
Volcanic soil is often very fertile. That is why many farms lie on the slopes of volcanoes despite the danger.
Coffee, grapes and rice all grow well in it.;
The software update fixes a bug that made the app crash when uploading photos. It also adds a dark mode. Users
should restart the app after installing the update.;
Camels can go many days without drinking. When they do find water, they can drink more than 100 liters in a few
minutes. Their humps store fat, not water.;
The local pool will offer free swimming lessons for children this summer. Lessons run on weekday mornings in July
and August. Parents must sign up at the front desk.;
The ancient Romans built roads across their empire. Many were so well made that parts of them are still used
today. The roads helped armies, traders and messengers move quickly.;
Our landlord has announced that the rent will rise by five percent in September. He says the increase will pay
for a new heating system. Tenants can ask questions at a meeting next Thursday.;
Rice is the main food of more than half of the people in the world. It grows best in warm, wet places, often in
flooded fields called paddies. China and India grow the most rice.;
The new library app lets members borrow e-books and audiobooks for free. Each member can borrow up to five titles
at a time for three weeks. The app works on phones, tablets and computers.
"""
PASSAGE_TEMPLATES_4 = [
    "Summarize this in one sentence: {x}",
    "What is the main point of this passage? {x}",
    "Summarize this for a child in one short sentence: {x}",
]
NOTES_4 = """
meeting moved to Thursday 3pm, room 204, bring sales numbers, Anna presenting the new budget;
party Saturday 7pm, my place, bring a dish, no gifts please, parking on the street;
project delayed two weeks, supplier late, new deadline 30 June, need approval for extra cost;
trip to Lisbon, flights booked 12-16 May, hotel near the old town, need travel insurance, ask Sam about airport pickup;
new hire starts Monday, laptop ready?, desk on 3rd floor, lunch with the team, HR forms;
school trip to the zoo, Friday, bus leaves 8:30, packed lunch, permission slip by Wednesday, cost 12 dollars;
kitchen renovation, builder's quote 8000, start in April, 3 weeks with no kitchen, need to pick tiles;
team offsite, 2 days, need a venue, budget 5000, agenda - goals for next year, team dinner;
garden club, next meeting 5 May, talk on roses, bring cuttings to swap, yearly fees due;
dentist Tues 10am, car service Wed, mum's birthday Fri - buy card, pay rent;
customer complaint, order 4521 arrived damaged, send replacement, refund shipping, apologize;
quarterly results - sales up 8 percent, costs up 3 percent, new store opened, hiring two people;
moving house 1 July, book a van, change address at the bank, cancel internet, pack books first;
wedding planning - venue booked, no caterer yet, 80 guests, invitations out by March, choose music;
conference talk accepted, 20 minutes, slides due 1 Sept, travel paid by company, hotel booked;
printer on 2nd floor broken, IT called, use the 4th floor printer until Monday;
football practice moved to Tuesdays, 5 to 6pm, new coach Mr Diaz, bring water, shin pads required;
book club - next book The Secret Garden, meet 20 Oct at Lisa's, bring snacks;
website launch next Friday, test checkout, fix typos on About page, tell customers;
volunteer day at the food bank, Saturday 9 to 1, wear closed shoes, need 10 people, sign-up sheet in the kitchen;
lost keys - checked car, office, gym, not found, locksmith coming at 6;
feedback from workshop - loved the examples, too long, more breaks, room too warm;
summer camp 15-26 July, 9am-3pm, swimming on Wednesdays, sunscreen, name labels on everything;
holiday rota - Jo off 20-27 Dec, Ben off 27 Dec-3 Jan, office closed 25-26 Dec, cover needed on the 24th;
neighborhood watch - two bikes stolen this month, lock sheds, report anything odd, next meeting at the church hall;
new office rules - wear badge at all times, visitors sign in, last person out locks the back door;
bake sale results - raised 640, brownies sold best, thanks to all bakers, money goes to the library;
car insurance renewal due 3 Nov, price up 15 percent, get other quotes, check no-claims discount;
study group - chapters 4 to 6, quiz on Monday, meet in library room B, bring past papers;
plumber visit - leak under sink fixed, replaced valve, cost 120, call back if it drips again;
family reunion 14 Aug, Grandma's farm, tents ok, everyone brings one dish, games for the kids;
interview notes - strong Python, little team experience, asked good questions, second interview yes;
marketing plan - new logo in May, three social posts a week, local radio ad, budget 2000;
vet visit - cat healthy, a bit overweight, less dry food, next check-up in a year;
charity run 10 km, Sunday 8am, start at the park gate, money for the hospital, T-shirts at registration;
office move - boxes arrive Monday, label with name and floor, IT moves computers Friday, new building opens after;
recipe changes - less sugar, add lemon zest, bake 5 minutes longer, tasters liked it;
apartment viewing - bright, small kitchen, noisy street, rent 1200, free from 1 March, decide by Friday;
parent-teacher meeting - reading improved, needs help with fractions, check homework more, next meeting June;
hackathon 48 hours, teams of 4, theme city transport, prizes, food provided, register by 10 May
"""
NOTE_TEMPLATES_4 = [
    "Turn these notes into a neat bulleted list: {x}",
    "Turn these notes into a short, polite email: {x}",
    "Turn these notes into a short message for my team: {x}",
]
SORTING_4 = """
animals into mammals and birds: whale, eagle, bat, penguin, dog, owl, dolphin, ostrich;
foods into fruits and vegetables: apple, carrot, banana, spinach, mango, broccoli, grape, potato;
words into nouns and verbs: run, table, sing, happiness, jump, city, write, idea;
numbers into even and odd: 3, 8, 15, 22, 31, 40, 57, 64;
animals into land animals and water animals: shark, lion, octopus, horse, salmon, rabbit, crab, camel;
materials into conductors and insulators of electricity: copper, rubber, iron, wood, glass, aluminum, plastic, silver;
items into recyclable and not recyclable: glass jar, greasy pizza box, newspaper, used tissue, aluminum can,
cardboard, broken mirror, paper cup;
countries by continent: Brazil, Kenya, Japan, Norway, Canada, Egypt, India, Peru, Italy, Australia;
planets into rocky planets and gas giants: Mars, Jupiter, Earth, Saturn, Venus, Neptune, Mercury, Uranus;
animals into herbivores, carnivores and omnivores: cow, wolf, bear, rabbit, tiger, pig, deer, crow;
words into adjectives and adverbs: quick, quickly, happy, softly, bright, loudly, careful, well;
shapes by their number of sides: triangle, square, pentagon, hexagon, octagon, rectangle, heptagon;
instruments into string, wind and percussion: violin, flute, drum, guitar, trumpet, xylophone, cello, clarinet;
things into solids, liquids and gases: ice, steam, juice, rock, air, milk, sand, helium;
numbers into prime and not prime: 2, 9, 11, 15, 17, 21, 23, 27, 29;
animals into insects and not insects: ant, spider, beetle, scorpion, butterfly, centipede, bee, tick;
foods into food groups: rice, chicken, cheese, lentils, apple, bread, yogurt, eggs, spinach;
household chores into daily, weekly and monthly: washing dishes, vacuuming, changing bed sheets, cleaning the oven,
taking out the trash, watering plants, dusting shelves;
programming languages into compiled and interpreted: C, Python, Rust, JavaScript, Go, Ruby, C++, Bash;
file types into images, documents and audio: .jpg, .docx, .mp3, .png, .pdf, .wav, .txt, .gif;
sports into team sports and individual sports: tennis, football, golf, basketball, swimming, volleyball, boxing,
rugby;
animals into egg-layers and animals born live: chicken, cow, snake, platypus, cat, turtle, goat, frog;
words by part of speech: beautiful, swim, under, slowly, teacher, and, they, bright;
objects into things that float and things that sink: cork, coin, apple, stone, wooden spoon, key, ice cube, marble;
foods into sweet, sour, salty and bitter: lemon, honey, crisps, dark chocolate, candy, pickles, black coffee, lime;
jobs into indoor jobs and outdoor jobs: farmer, accountant, lifeguard, librarian, gardener, programmer, mail
carrier, dentist;
vehicles into land, water and air vehicles: bus, canoe, helicopter, tractor, ferry, glider, bicycle, submarine;
expenses into needs and wants: rent, concert tickets, groceries, electricity, new sneakers, phone plan, streaming
service, medicine;
elements into metals and non-metals: oxygen, gold, carbon, sodium, nitrogen, copper, sulfur, zinc;
trees into evergreen and deciduous: pine, oak, spruce, maple, holly, birch, fir, beech;
statements into facts and opinions: Paris is in France, pizza is the best food, water boils at 100 degrees Celsius,
cats are nicer than dogs, the Moon orbits the Earth, summer is the most fun time of year;
inventions by the century they appeared in: the telephone, the printing press, the smartphone, the steam engine,
the airplane, the light bulb, the television;
animals into nocturnal and diurnal: owl, eagle, bat, squirrel, hedgehog, butterfly, raccoon, horse;
words into synonyms of happy and synonyms of sad: cheerful, gloomy, joyful, miserable, content, down, glad,
sorrowful;
dishes by country of origin: sushi, paella, tacos, croissant, pad thai, pizza, borscht, falafel;
metals into magnetic and non-magnetic: iron, copper, nickel, aluminum, cobalt, gold, steel, silver;
Python types into mutable and immutable: list, str, dict, set, int, frozenset, bytes, bytearray;
body parts into organs and bones: heart, femur, liver, skull, lungs, rib, kidney, spine;
words by their number of syllables: cat, elephant, window, banana, dog, computer, apple, strawberry;
sentences into questions, commands and statements: close the door, is it raining, the bus is late, please sit
down, where are my keys, I like tea;
birds into flying birds and flightless birds: emu, sparrow, kiwi, chicken, penguin, swallow, ostrich, pelican;
shell commands into file commands, process commands and network commands: ls, ps, ping, cp, kill, curl, mv, top;
git commands into local and remote operations: commit, push, pull, branch, fetch, log, clone, status;
HTTP status codes into success, redirect and error codes: 200, 404, 500, 201, 403, 301, 204, 503;
spellings into British and American: colour, color, centre, center, organise, organize, travelled, traveled;
units into length, mass and volume: meter, liter, gram, mile, pound, gallon, inch, kilogram
"""
SORTING_TEMPLATES_4 = ["Sort these {x}.", "Classify these {x}. Explain any tricky ones."]
QUESTIONS_4 = """
What is the largest desert in Asia?; What is the longest river in Europe?; What is the capital of Canada?;
What is the capital of Australia?; Which country has the most people?; What is the smallest country in the world?;
What is the highest mountain in Africa?; What is the largest lake in Africa?; Which ocean is the largest?;
Which continent has the most countries?; What is the capital of Brazil?; Which river flows through Paris?;
What is the highest waterfall in the world?; How many continents are there?; Which country is shaped like a boot?;
What is the largest island in the world?; What language is spoken in Brazil?; What is the capital of Japan?;
Which mountains are often said to divide Europe from Asia?; What is the deepest lake in the world?;
What is the driest desert in the world?; What is the capital of Egypt?; Which country has the longest coastline?;
Where is the Great Barrier Reef?; What is the largest country in South America?;
Which two countries share the longest border?; What is the capital of New Zealand?;
Which city is known as the Big Apple?; Which countries does the equator pass through?; What is the capital of Kenya?;
What is the longest mountain range in the world?; Which US state is the largest by area?;
What is the tallest building in the world?; In which country is Mount Kilimanjaro?; What is the capital of Argentina?;
In which country is the city of Marrakesh?; What is the longest river in Asia?; Which country has the most islands?;
What is the southernmost continent?;
Which river flows through Cairo?; What is the capital of Spain?; Which country has the most lakes?;
What is the largest city in Australia?; Which country is both in Europe and in Asia?;
What is the chemical symbol for gold?; How many bones are in the adult human body?;
What is the boiling point of water in Fahrenheit?; What is the hardest natural substance?;
How many planets are in our solar system?; Which planet is closest to the Sun?;
What is the largest planet in our solar system?; What is the most common gas in the air we breathe?;
How long does light from the Sun take to reach Earth?; What is the chemical formula for table salt?;
Which part of a cell holds the DNA?; What is the largest organ of the human body?;
How many chambers does the human heart have?; What is the freezing point of water in Celsius?;
Which blood cells fight infection?; How fast does sound travel in air?; Which metal is liquid at room temperature?;
What is the lightest element?; How many teeth does an adult usually have?;
Which star is closest to Earth after the Sun?; Which planet has the most moons?; What is the pH of pure water?;
What does a seismograph measure?; What is the unit of electrical resistance?; Who discovered penicillin?;
How many legs does a spider have?; What is the fastest land animal?; What is the largest mammal?;
What is the tallest animal?; How many hearts does an octopus have?; What do caterpillars turn into?;
Which bird lays the largest eggs?; What is the chemical symbol for iron?;
What is the most common element in the universe?; What is absolute zero?; How far is the Moon from Earth?;
How old is the Earth?; What is the center of an atom called?; Which instrument measures air pressure?;
What is glass mostly made from?; Which vitamin does sunlight help the body make?;
How many chromosomes do humans have?; What is the longest bone in the human body?;
What is the smallest bone in the human body?; What is a group of lions called?; How long is a day on Mars?;
What is the hottest planet in the solar system?; What is the chemical symbol for sodium?;
How many moons does Mars have?; What is the biggest bird alive today?; What is the largest fish?;
How many eyes does a bee have?; What is the strongest muscle in the human body?;
Who was the first person to walk on the Moon?; In what year did World War II end?;
When did the Berlin Wall fall?; Who was the first President of the United States?; Who invented the telephone?;
Who wrote Romeo and Juliet?; When did the Titanic sink?; Which people built Machu Picchu?;
Who painted the Mona Lisa?; In what year did Columbus first reach the Americas?;
Who was the first woman to win a Nobel Prize?; What was the Magna Carta?; When did the First World War begin?;
Which Roman city was buried by Mount Vesuvius?; Who was the first emperor of China?;
What language did the ancient Romans speak?; When was the printing press invented in Europe?;
Who was the first woman to fly solo across the Atlantic?; When did the United States declare independence?;
Which country gave the Statue of Liberty to the United States?; Who was the first person to reach the South Pole?;
What did the Wright brothers invent?; When did the Western Roman Empire fall?; Who was the first person in space?;
When was the Eiffel Tower built?; Who invented the World Wide Web?;
What was the writing system of ancient Egypt called?; Which civilization invented paper?;
Who was Kublai Khan?; When did the Soviet Union break up?; Which was the first country to give women the vote?;
Who founded the city of Alexandria?; Which war was fought between the North and the South of the United States?;
Who was the last pharaoh of ancient Egypt?; When did the Black Death reach Europe?;
When were the first modern Olympic Games held?; Who composed the Moonlight Sonata?;
Who built the first successful steam locomotive?; When did the first person climb Mount Everest?;
Who was the first Roman emperor?; What was the Bronze Age?; Who wrote the Odyssey?;
When did the Wall Street Crash happen?; Who led India to independence with nonviolent protest?;
Which city was the capital of the Byzantine Empire?; Who discovered the structure of DNA?;
How many minutes are in a day?; How many days are in a leap year?; How many grams are in a kilogram?;
How many ounces are in a pound?; How many centimeters are in an inch?; How many teaspoons are in a tablespoon?;
What is the normal human body temperature?; How much water should an adult drink each day?;
How long does it take to walk a mile?; What size is a sheet of A4 paper?; How can you tell if an egg is fresh?;
How many keys does a standard piano have?; How many players does a football team have on the field?;
How many cards are in a standard deck?; How long is a marathon?; What does RSVP mean on an invitation?;
What does ASAP stand for?; What does "e.g." mean?; How much should I tip at a restaurant in the United States?;
How long do cats usually live?; How long do dogs usually live?; At what age do babies usually start walking?;
How many hours a week is full-time work?; What does a flashing yellow traffic light mean?;
Which side of the road do people drive on in Japan?; What is the emergency phone number in Europe?;
What is a comfortable room temperature for a home?; How often should I water a cactus?;
How often should I change the oil in my car?; How long does wall paint take to dry?;
How many calories are in a banana?; Does honey ever go bad?; How many weeks are in a year?;
How many seconds are in an hour?; What is the Roman numeral for 50?; What is a baker's dozen?;
How many sides does a hexagon have?; Which language has the most native speakers?;
What currency is used in Japan?; What currency is used in Switzerland?; How often should I replace my toothbrush?;
What temperature should chicken be cooked to?; How many milliliters are in a cup?; How many feet are in a mile?;
How long should I let a steak rest after cooking?; What is the shelf life of dried pasta?;
How many strings does a standard guitar have?;
What does "FAQ" stand for?; What does "p.s." mean at the end of a letter?; How many zeros are in a million?;
What is the boiling point of water at sea level?; How many players are on a basketball court per team?;
 How many squares are on a chessboard?;
What is the capital of Italy?; What is the capital of Germany?; What is the capital of South Korea?;
What is the capital of Turkey?; What is the capital of Thailand?; What is the capital of Mexico?;
What is the largest country in Africa?; What is the highest mountain in Europe?; What is the longest river in
Africa?; What is the smallest continent?; Which country has the most time zones?;
In which city is the headquarters of the United Nations?; What is the largest lake in North America?;
Which country grows the most coffee?; What is the longest river in South America?;
Which countries make up Scandinavia?; What is the largest city in Canada?; What is the chemical formula for water?;
How many bones does a shark have?; What is the main gas in the Sun?; How many legs does an insect have?;
What is the fastest bird?; What is the largest living tree?; How long is a year on Mercury?;
What do you call an animal that eats only plants?; Which planet comes closest to Earth?;
What color is a polar bear's skin?; How many lungs do humans have?; What is the chemical symbol for silver?;
What is the most common metal in Earth's crust?; What is the unit of electric current?;
Who came up with the theory of relativity?; What is the largest reptile?; How many kinds of penguin are there?;
Which animal lives the longest?; Who was the first woman prime minister of the United Kingdom?;
When was the Great Wall of China begun?; Who invented the printing press in Europe?;
Which ancient wonder stood in Alexandria?; When did Apollo 11 land on the Moon?;
When did the French Revolution begin?; Who wrote the Declaration of Independence?;
In which city was Julius Caesar killed?; Whose expedition first sailed around the world?;
When did the Chernobyl disaster happen?; What was the Marshall Plan?; How many liters are in a gallon?;
How many days are in each month?; How many hours are in a week?; What is 20 percent of 50?;
How many pounds are in a kilogram?; How long should I brush my teeth?; How long should I boil a hard-boiled egg?;
How many years are in a century?; What is the freezing point of water in Fahrenheit?;
How many centimeters are in a meter?; What does DIY stand for?; How many sides does an octagon have?;
What is the tallest mountain in North America?; Which country has the largest population in Africa?
"""
QUESTION_TEMPLATES_4 = ["{x}", "{x} Answer briefly, then add one interesting detail."]
STEPS_4 = """
iron a shirt; fold a fitted sheet; descale a kettle; clean an oven; clean a bathroom; wash a wool sweater by hand;
remove a coffee stain from a carpet; bleed a radiator; sew on a button; hem a pair of trousers;
clean windows without streaks; assemble flat-pack furniture; put up a shelf; fix a dripping tap;
reset a tripped circuit breaker; clean a washing machine; organize a junk drawer; wash a pillow; polish leather
shoes; clean a shower head; patch a small hole in a wall; replace a toilet seat; seal around a bathtub;
clean a cast-iron pan; clean grout between tiles; get rid of fruit flies; wrap a present neatly; tie a tie;
hang curtains; change a duvet cover; set a table for a formal dinner; boil pasta perfectly; cook rice on the stove;
poach an egg; make a roux; carve a roast chicken; chop an onion; peel garlic quickly; cook dried beans;
make stock from vegetable scraps; knead bread dough; make pie crust; whip cream by hand; separate an egg;
melt chocolate without burning it; caramelize onions; cook a steak in a pan; make a simple syrup;
brew loose-leaf tea; make cold brew coffee; toast nuts in a pan; cook quinoa; steam vegetables;
make homemade croutons; fillet a fish; zest a lemon; make fresh pasta by hand; apply for a passport;
check in for a flight online; get through airport security quickly; exchange money abroad; rent a car abroad;
book a cheap flight; plan a train trip across Europe; use the metro in a foreign city;
find a place to stay for a last-minute trip; buy travel insurance; make a travel budget;
get my home ready before going on holiday; renew a driving license; write a research paper; make flashcards;
take notes with the Cornell method; prepare for an oral exam; memorize a poem; write a lab report;
cite sources in APA style; make a mind map; read a scientific paper; outline an essay; revise for a maths exam;
learn a list of vocabulary words; write a book report; make a science poster; practice for a spelling test;
solve a maths word problem; write a five-paragraph essay; study with the Pomodoro technique;
jump-start a car battery; change a car tire; check the tire pressure on my car; clean a laptop keyboard;
set up a new printer; transfer photos from a phone to a computer; update the software on my phone;
frame a photo; plant a tree; prune a rose bush; mow a lawn; start seeds indoors
"""
STEP_TEMPLATES_4 = [
    "Give me step-by-step instructions to {x}.",
    "Walk me through how to {x}, one step at a time.",
    "What are the steps to {x}? Number them.",
]
STEP_MISTAKE_TEMPLATES_4 = ["What are common mistakes to avoid when you {x}?"]
DIALOGUES_4 = """
a customer and a waiter at a busy restaurant; two friends planning a weekend trip; a doctor and a patient with a
sore throat; a teacher and a student who forgot their homework; a tourist asking a local for directions;
a job candidate and an interviewer; a shop assistant and a customer returning a jacket;
two neighbors meeting for the first time; a parent and a teenager discussing screen time;
a librarian and a child looking for a book about dinosaurs; a hotel receptionist and a guest whose room is not
ready; two coworkers deciding where to eat lunch; a pilot and a nervous passenger; a barista and a regular
customer; a landlord and a tenant about a broken heater; a coach and a player before a big match;
a grandparent and a grandchild about life fifty years ago; a bank clerk and a customer opening an account;
a pharmacist and a customer asking about cough syrup; a taxi driver and a passenger who is late for a train;
a new student and a classmate on the first day; a mechanic and a driver whose car makes a strange noise;
two astronauts on the International Space Station; a chef and an apprentice learning to chop onions;
a museum guide and a curious visitor; a customer and a support agent about a slow internet connection;
a real estate agent and a couple looking at a house; two siblings arguing over the last slice of cake;
a vet and a worried dog owner; a park ranger and a family of campers; a tailor and a customer being fitted for a
suit; a bookseller and a customer looking for a gift; two friends who have not seen each other for ten years;
a travel agent and a couple planning a honeymoon; a robot and a child meeting for the first time;
a flight attendant and a passenger who wants to change seats; a police officer and a driver who was speeding;
a gardener and a neighbor admiring the roses; a team leader and a new intern on the first morning;
a shopkeeper and a customer haggling at a market
"""
DIALOGUE_TEMPLATES_4 = [
    "Write a short dialogue between {x}.",
    "Write the opening lines of a conversation between {x}.",
    "Write a funny short dialogue between {x}.",
]
ROLES_4 = """
a friendly tour guide in Rome; a job interviewer for a marketing role; a waiter taking my order in a French café;
a customer at my bakery; a travel agent helping me plan a trip to Japan; a Spanish teacher giving my first lesson;
a personal trainer meeting me for the first time; a librarian helping me find a good novel;
a guide in a natural history museum; a shopkeeper at a busy market; a pirate captain welcoming me aboard;
a wise old wizard; a medieval knight; a news reporter interviewing me about my town;
a flight attendant on a long flight; a hotel concierge in New York; a career counselor; a chess coach;
a gardener giving me a tour of a garden; a chef teaching a cooking class;
an unhappy customer, so that I can practice customer service; a landlord showing me an apartment;
a bank adviser helping me open an account; a time traveler from the year 3000; a friendly alien visiting Earth;
a ship's captain in the 1700s; a ranger at a national park; a radio host interviewing me about my hobby;
a driving instructor on my first lesson; a barista at a coffee shop; a salesperson in an electronics store;
a tutor helping me with algebra; a fortune teller at a fair; a cat who can talk;
an explorer just back from the Arctic; a receptionist at a doctor's office;
a debate opponent who thinks homework should be banned; a job candidate I am interviewing;
a pen pal from Australia; a zookeeper showing me the animals
"""
ROLE_TEMPLATES_4 = [
    "Pretend you are {x}. Start the conversation.",
    "Let's role-play. You are {x}. Say your first lines.",
    "Role-play with me: you are {x}. Begin, and wait for my reply.",
]
LIMERICKS_4 = """
a dentist who was afraid of teeth; a man from Peru who lost his shoe; a cow who wanted to dance;
a programmer who could not find the bug; a teacher who lost her chalk; a goat who ate a coat;
a baker who hated bread; a cat who learned to type; a plumber with a leaky boat; a girl who talked to the Moon;
a runner who always came second; a dog who was scared of the mail carrier; a gardener who grew a giant pumpkin;
a wizard whose spells went wrong; a pigeon in a city square; a duck who wanted to drive;
a snowman who wanted a suntan; an old man with a very loud sneeze; a parrot who told secrets;
a knight in a rusty suit of armor; a tourist who got lost in Rome; a cook who used too much salt;
a bus driver who forgot the way; a hamster on a wheel; a queen who loved cheese; a fisherman who caught a boot;
a student who studied all night; a singer who could not hold a note; a painter who only used blue;
a robot vacuum that escaped; a cactus who wanted a hug; a clock that was always late; a tiger who ate only salad;
a mouse in a cheese shop; a camel who hated sand; a tailor who sewed his own sleeve shut;
a poet who could not find a rhyme; a grandma on a skateboard; a giraffe with a sore throat; a spoon that ran away
"""
LIMERICK_TEMPLATES_4 = ["Write a limerick about {x}.", "Write a funny limerick about {x}, and give it a title."]
SLOGANS_4 = """
a neighborhood bakery; a recycling campaign at school; a dog-walking service; an electric scooter rental company;
a vegetarian restaurant; a local bookshop; a reusable water bottle; a car wash; a plumbing company; a yoga studio;
a children's museum; a pizza delivery service; a language school; a farmers' market; a charity run for a hospital;
a tech support service for older people; a juice bar; a house-cleaning company;
a summer reading challenge at a library; a solar panel installer; a handmade soap shop; a campaign to save water;
a coding club for girls; a local zoo; a moving company; a flower shop; a tutoring service;
a vintage clothing store; a taco truck; a garden center; a road safety campaign; a pet grooming salon;
a community garden; a coffee roaster; an ice cream parlor; a bicycle repair café; a board game café;
a travel agency for families; a campaign to get young people to vote; a hardware store
"""
SLOGAN_TEMPLATES_4 = ["Write three catchy slogans for {x}.", "Suggest a short, memorable slogan for {x}."]
RIDDLES_4 = """
a clock; a shadow; an echo; a candle; a map; a key; a towel; a piano; a mirror; an egg; a sponge; a pencil;
a book; a bottle; a secret; a river; the letter E; a coin; a footstep; a needle; an umbrella; a keyboard;
a stamp; a window; a cloud; a fire; a hole; a tree; a chair; a bell; a teapot; a rainbow; a snowman;
a calendar; a battery; a ladder; a glove; a comb; a doorbell; a compass
"""
RIDDLE_TEMPLATES_4 = [
    "Write a riddle whose answer is {x}.",
    "Make up a short riddle for kids where the answer is {x}.",
]
PRODUCTS_4 = """
a pair of noise-cancelling headphones; a handmade wooden cutting board; a lightweight travel backpack;
a bamboo toothbrush; a smart desk lamp; a cast-iron skillet; a set of colored pencils for artists;
a folding electric bike; a wool winter hat; a ceramic coffee mug; a portable phone charger;
a beginner's telescope; a yoga mat; a children's picture book about space; a scented soy candle;
a robot vacuum cleaner; a rain jacket; a leather notebook; a mechanical keyboard; an insulated lunch box;
a herb-growing kit; a jigsaw puzzle with 1000 pieces; a pair of running shoes; a kids' bicycle helmet;
a wireless computer mouse; a set of kitchen knives; a linen tablecloth; a dog bed; a cat scratching post;
a solar garden light; a travel pillow; a silk scarf; a jar of local honey; a family board game;
a digital kitchen scale; a reusable shopping bag; a small desk plant in a pot; a pair of reading glasses;
a baby blanket; a hand-knitted sweater
"""
PRODUCT_TEMPLATES_4 = [
    "Write a short product description for {x}.",
    "Write a product description for {x} for an online shop, in under 60 words.",
]
MATH_4 = """
a prime number; a composite number; an even number; an odd number; a factor; a multiple;
the greatest common divisor; the least common multiple; a fraction; an improper fraction; a mixed number;
a decimal; a ratio; a proportion; a negative number; an integer; a rational number; an irrational number;
a square number; a square root; a cube number; an exponent; scientific notation; the order of operations;
a variable in algebra; an equation; an inequality; a linear equation; a function in mathematics; the slope of a
line; the mean; the median; the mode; the range of a data set; an outcome in probability; a right angle;
an acute angle; an obtuse angle; the perimeter of a shape; the area of a shape; the volume of a solid;
the circumference of a circle; a polygon; line symmetry; parallel lines; perpendicular lines; a coordinate;
a number sequence; an arithmetic sequence; a geometric sequence; a factorial; a logarithm; place value;
rounding; estimation; long division; a remainder; a reciprocal; absolute value; simple interest
"""
MATH_TEMPLATES_4 = [
    "What is {x}? Give examples.",
    "Explain {x} in simple words, with an example.",
    "How would you explain {x} to someone who finds maths hard?",
]
JS_4 = """
declare a variable; define a function that adds two numbers; loop over an array; add an item to an array;
remove the last item from an array; find an item in an array; filter an array;
transform every item of an array with map;
sort an array of numbers; sort an array of objects by a property; reverse a string; check if a string contains a
word; convert a string to a number; convert a number to a string; round a number to two decimal places;
get the current date; format a date as day, month and year; create an object; loop over the keys of an object;
copy an object; merge two objects; check if a variable is undefined; handle an error with try and catch;
wait for a promise to finish; fetch data from an API; parse a JSON string; turn an object into a JSON string;
change the text of an HTML element; add a click event listener to a button; hide an element on a page;
add a CSS class to an element; read the value of an input box; save data in localStorage;
redirect to another page; run code after a delay with setTimeout; repeat an action with setInterval;
generate a random whole number; remove duplicates from an array; sum the numbers in an array;
find the largest number in an array; count how often each word appears in a string; check if an array is empty;
split a string into words; join an array into a string; capitalize the first letter of a string;
pad a number with leading zeros; define a simple class with a constructor; export a function from a module;
import a function from another file
"""
JS_TEMPLATES_4 = [
    "How do I {x} in JavaScript?",
    "Write JavaScript code to {x}, and explain it.",
    "Show me a short JavaScript example of how to {x}.",
]
JS_TERMS_4 = """
`let`; `const`; `var`; hoisting; an arrow function; a callback; a promise; an async function; the `await` keyword;
the event loop;
a closure; the `this` keyword; the DOM; an event listener; `null`; `undefined`; the `===` operator;
a template literal; destructuring; the spread operator; an object literal; JSON; the array method `map`;
the array method `reduce`; `NaN`; type coercion; a module; npm; Node.js; strict mode; a prototype;
a class; optional chaining; the nullish coalescing operator; the `typeof` operator; block scope
"""
JS_TERM_TEMPLATES_4 = ["What is {x} in JavaScript?", "Explain {x} in JavaScript with a short example."]
SHELL_TASKS_4 = """
list files sorted by size; list files sorted by date; copy a folder with everything in it;
find files changed in the last day; delete all .pyc files in a project; count the files in a folder;
show how much space each folder takes; print my username; find my computer's IP address;
check if a website is reachable; replace a word in many files at once; find a file by its name;
print the full path of a file; make a compressed archive of a folder; find which program uses the most memory;
stop a program that is not responding; check CPU and memory usage; see how long the computer has been running;
create an alias for a long command; set an environment variable; add a folder to my PATH;
run the previous command again; search my command history; clear the terminal screen;
show a file with line numbers; sort the lines of a file; remove duplicate lines from a file;
show only the lines of a file that match a pattern; count how many times a word appears in a file;
make a file readable only by me; change the owner of a file; create a symbolic link;
check which shell I am using; run a script every day at a set time; copy files to a remote server;
log in to a remote server with an SSH key; check which version of Python is installed;
send error messages to a file; run a second command only if the first one succeeds;
loop over all files in a folder; see the manual page of a command
"""
SHELL_TASK_TEMPLATES_4 = [
    "How do I {x} in a Linux terminal?",
    "Which shell command lets me {x}? Show an example.",
    "What is the quickest way to {x} from a bash prompt?",
]
BASH_4 = """
read input from the user in a bash script; check if a file exists in a bash script; pass arguments to a bash script;
loop over the lines of a file in a bash script; use an if statement in a bash script; write a bash script that
backs up a folder; define a function in a bash script; exit a bash script with an error code;
use a for loop in a bash script; do arithmetic in a bash script; store a command's output in a variable in bash;
check the exit code of the last command in bash; make a bash script stop at the first error;
compare two strings in a bash script; check if a folder exists in a bash script;
print a message to standard error in bash; use a case statement in a
bash script; give a variable a default value in a bash script; count the arguments passed to a bash script;
make a bash script print each command before running it
"""
BASH_TEMPLATES_4 = ["How do I {x}?", "Show me how to {x}, with a short example."]
GIT_4 = """
undo the last commit; undo the last commit but keep my changes; change the message of the last commit;
see the history of commits; see what changed in a file; throw away my changes to a file; unstage a file;
create a new branch; switch to another branch; delete a branch; rename a branch; merge a branch into main;
resolve a merge conflict; see which branch I am on; push a new branch to the remote; pull the latest changes;
clone a repository; start a new repository; ignore files with a .gitignore file;
stop tracking a file without deleting it; stash my changes; get my stashed changes back;
see the differences between two branches; undo a commit that I already pushed; go back to an old commit;
find which commit introduced a bug; see who last changed each line of a file; add a remote;
change the URL of a remote; tag a release; squash several commits into one; copy one commit to another branch;
undo a git add; recover a deleted branch; see the files changed in a commit; update my branch with the latest
main; list all branches; delete a remote branch; check the status of my repository;
commit only some of my changes; set my name for commits; see a short one-line log; undo a bad merge;
download changes without merging them; remove untracked files; add a forgotten file to the last commit
"""
GIT_TEMPLATES_4 = [
    "How do I {x} in git?",
    "What git command do I use to {x}? Explain what it does.",
    "I need to {x} in git. Which commands should I run?",
]
GIT_TERMS_4 = """
a commit; a branch; the staging area; HEAD; a remote; origin; a merge conflict; a fast-forward merge; a rebase;
a detached HEAD; a fork; a tag; the stash; `git fetch`; `git pull`; `git reset`; `git revert`;
`git cherry-pick`; a `.gitignore` file; the working tree; `git bisect`; a submodule; the reflog
"""
GIT_TERM_TEMPLATES_4 = ["What is {x} in git?", "Explain {x} in git in simple terms."]
CODE_TASKS_4 = """
check if a number is a perfect square; convert a Roman numeral to an integer; convert an integer to a Roman
numeral; find all primes up to n with the sieve of Eratosthenes; check if a string has balanced brackets;
compress a string like aaabb into a3b2; expand a string like a3b2 back into aaabb;
find the first character that does not repeat in a string; find the longest common prefix of a list of words;
check if a sentence is a pangram; reverse the order of the words in a sentence; convert a sentence to snake_case;
convert snake_case to camelCase; remove the vowels from a string; check if a number is an Armstrong number;
compute all subsets of a list; generate all permutations of a string; find pairs in a list that add up to a
target; merge two sorted lists into one sorted list; search a sorted list with binary search;
implement bubble sort; implement insertion sort; implement a stack with a list; implement a queue with
collections.deque; print a text bar chart of letter counts; read numbers from a file and print their sum;
write a list of dictionaries to a CSV file; load a CSV file into a list of dictionaries;
find the most frequent word in a text file; check a phone number with a regular expression;
extract all the numbers from a string; extract all links from a piece of HTML; count the digits in a number;
sum a list with recursion; flatten a dictionary of dictionaries; swap the keys and values of a dictionary;
split a list of numbers into odd and even; find the missing number in a list from 1 to n;
check if two lists have the same items in any order; rotate a matrix by 90 degrees;
compute the dot product of two lists; make a simple quiz game; make a rock-paper-scissors game;
make a hangman game for the terminal; simulate flipping a coin 1000 times; compute compound interest year by year;
convert seconds into hours, minutes and seconds; check if a date falls on a weekend; list all the Mondays in a
month; work out a person's age from their birth date; print a calendar for a month; make a simple text menu;
retry a function call that sometimes fails; cache the results of a slow function; time a piece of code with
timeit; read command-line arguments; print a table with aligned columns; wrap long text at 40 characters;
generate a random string of letters and digits; split a big file into smaller files; find the largest file in a
folder; count the files in a folder and all its subfolders; download a web page with urllib;
send a simple HTTP request and print the status code; check if a string is a valid IPv4 address
"""
CODE_TASK_TEMPLATES_4 = [
    "Write Python code to {x}.",
    "How would you {x} in Python? Show a short solution.",
    "Write short, well-commented Python code to {x}.",
]


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
    second = _write(_expand((
        ("concept", concepts, CONCEPT_TEMPLATES_2),
        ("concept", _items(CONCEPTS_2), CONCEPT_TEMPLATES),
        ("howto", _items(TASKS) + _items(TASKS_2), TASK_TEMPLATES_2),
        ("howto", _items(TASKS_2), TASK_TEMPLATES),
        ("creative", _items(THINGS) + _items(THINGS_2), THING_TEMPLATES_2),
        ("creative", _items(THINGS_2), THING_TEMPLATES),
        ("code-task", _items(CODE_TASKS) + _items(CODE_TASKS_2), CODE_TASK_TEMPLATES_2),
        ("code-task", _items(CODE_TASKS_2), CODE_TASK_TEMPLATES),
    )), OUT2, exclude=set(first))
    third = _write(_expand((
        ("compare", _items(PAIRS_3), PAIR_TEMPLATES_3),
        ("compare", _items(PAIRS), OLD_PAIR_TEMPLATES_3),
        ("facts", _items(FACTS_3), FACT_TEMPLATES_3),
        ("ideas", _items(IDEAS_3), IDEA_TEMPLATES_3),
        ("tips", _items(TIPS_3), TIP_TEMPLATES_3),
        ("pros-cons", _items(PROS_CONS_3), PROS_CONS_TEMPLATES_3),
        ("define", _items(WORDS_3), WORD_TEMPLATES_3),
        ("define", _items(TERMS_3), TERM_TEMPLATES_3),
        ("why", _items(WHY_3) + _items(WHY_MORE_3), WHY_TEMPLATES_3),
        ("why", _items(WHY_QUESTIONS_3), WHY_QUESTION_TEMPLATES_3),
        ("myth", _items(MYTHS_3), MYTH_TEMPLATES_3),
        ("what-if", _items(WHAT_IF_3), WHAT_IF_TEMPLATES_3),
        ("what-if", _items(IMAGINE_3), IMAGINE_TEMPLATES_3),
        ("people", _items(PEOPLE_3), PEOPLE_TEMPLATES_3),
        ("device", _items(DEVICES_3), DEVICE_TEMPLATES),
        ("recommend", _items(RECOMMEND_3), RECOMMEND_TEMPLATES_3),
        ("recommend", _items(CHOICES_3), CHOICE_TEMPLATES_3),
        ("recipe", _items(RECIPES_3), RECIPE_TEMPLATES_3),
        ("rewrite", _items(POLITE_3), POLITE_TEMPLATES_3),
        ("rewrite", _items(GRAMMAR_3), GRAMMAR_TEMPLATES_3),
        ("rewrite", _items(PHRASES_3), PHRASE_TEMPLATES_3),
        ("writing", _items(MESSAGES_3), MESSAGE_TEMPLATES_3),
        ("writing", _items(WRITING_3), WRITING_TEMPLATES_3),
        ("howto", _items(BUDGET_3), BUDGET_TEMPLATES_3),
        ("howto", _items(TEN_MINUTES_3), TEN_MINUTES_TEMPLATES_3),
        ("howto", _items(TASKS) + _items(TASKS_2), TASK_TEMPLATES_3),
        ("plan", _items(PLANS_3), PLAN_TEMPLATES_3),
        ("code-error", _items(PY_ERRORS_3), PY_ERROR_TEMPLATES_3),
        ("code-concept", _items(PY_CONCEPTS_3), PY_CONCEPT_TEMPLATES_3),
        ("code-task", _items(CODE_TASKS_3), CODE_TASK_TEMPLATES_3),
        ("sql", _items(SQL_3), SQL_TEMPLATES_3),
        ("sql", _items(SQL_TERMS_3), SQL_TERM_TEMPLATES_3),
        ("shell", _items(SHELL_3), SHELL_TEMPLATES_3),
        ("shell", _items(SHELL_TASKS_3), SHELL_TASK_TEMPLATES_3),
        ("creative", _items(SCENES_3), SCENE_TEMPLATES_3),
        ("creative", _items(CHARACTERS_3), CHARACTER_TEMPLATES_3),
        ("creative", _items(THINGS) + _items(THINGS_2), OLD_THING_TEMPLATES_3),
        ("concept", [x for x in concepts if "email" not in x], CONCEPT_TEMPLATES_3),
    )), OUT3, exclude=set(first) | set(second))

    def near_bench(items):  # round 4 also leaves out topics close to the benchmark's
        return [x for x in items if not any(w in x.lower() for w in NEAR_BENCH_4)]

    _write(_expand((
        ("concept", near_bench(concepts), CONCEPT_TEMPLATES_4),
        ("device", near_bench(_items(DEVICES) + _items(DEVICES_3)), DEVICE_TEMPLATES_4),
        ("compare", near_bench(_items(PAIRS) + _items(PAIRS_3)), PAIR_TEMPLATES_4),
        ("why", near_bench(_items(WHY_3)), WHY_TEMPLATES_4),
        ("define", near_bench(_items(TERMS_3)), TERM_TEMPLATES_4),
        ("facts", near_bench(_items(FACTS_3)), FACT_TEMPLATES_4),
        ("facts", _items(QUESTIONS_4), QUESTION_TEMPLATES_4),
        ("people", _items(PEOPLE_3), PEOPLE_TEMPLATES_4),
        ("define", near_bench(_items(WORDS_3)), WORD_TEMPLATES_4),
        ("mistakes", near_bench(_items(TASKS) + _items(TASKS_2)), MISTAKE_TEMPLATES_4),
        ("mistakes", _items(STEPS_4), STEP_MISTAKE_TEMPLATES_4),
        ("steps", _items(STEPS_4), STEP_TEMPLATES_4),
        ("summarize", _items(PASSAGES_4), PASSAGE_TEMPLATES_4),
        ("notes", _items(NOTES_4), NOTE_TEMPLATES_4),
        ("sort", _items(SORTING_4), SORTING_TEMPLATES_4),
        ("dialogue", _items(DIALOGUES_4), DIALOGUE_TEMPLATES_4),
        ("dialogue", _items(ROLES_4), ROLE_TEMPLATES_4),
        ("creative", _items(LIMERICKS_4), LIMERICK_TEMPLATES_4),
        ("creative", _items(SLOGANS_4), SLOGAN_TEMPLATES_4),
        ("creative", _items(RIDDLES_4), RIDDLE_TEMPLATES_4),
        ("creative", _items(PRODUCTS_4), PRODUCT_TEMPLATES_4),
        ("math", _items(MATH_4), MATH_TEMPLATES_4),
        ("javascript", _items(JS_4), JS_TEMPLATES_4),
        ("javascript", _items(JS_TERMS_4), JS_TERM_TEMPLATES_4),
        ("shell", _items(SHELL_TASKS_4), SHELL_TASK_TEMPLATES_4),
        ("shell", _items(BASH_4), BASH_TEMPLATES_4),
        ("git", _items(GIT_4), GIT_TEMPLATES_4),
        ("git", _items(GIT_TERMS_4), GIT_TERM_TEMPLATES_4),
        ("code-task", _items(CODE_TASKS_4), CODE_TASK_TEMPLATES_4),
    )), OUT4, exclude=set(first) | set(second) | set(third))


if __name__ == "__main__":
    main()
